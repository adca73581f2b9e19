"""Warm starts (`--init-from`) and distillation (`--teacher`)."""

import pytest
import torch
import torch.nn.functional as F

from fpet.errors import FpetError
from tests.helpers.tiny import make_image_folder, tiny_config
from training import checkpoint
from training.data import Preprocessing, open_split
from training.loop import train
from training.teacher import distill_loss, teacher_logits, training_loss, warm_start


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def source(data, tmp_path_factory):
    """A trained run without merging: the teacher and the warm start's source."""
    out = tmp_path_factory.mktemp("source") / "run"
    train(tiny_config(data, out, schedule="none", epochs=2), log=lambda _: None)
    return out


def quiet(_message: str) -> None:
    pass


def test_a_zero_weight_gives_the_plain_cross_entropy_exactly_and_a_teacher_changes_the_gradient():
    torch.manual_seed(0)
    logits, labels, teacher = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.randn(8, 5)
    assert torch.equal(training_loss(logits, labels, teacher, 0.0, 2.0), F.cross_entropy(logits, labels))

    def gradient(loss) -> torch.Tensor:
        x = logits.clone().requires_grad_()
        return torch.autograd.grad(loss(x), x)[0]

    plain = gradient(lambda x: F.cross_entropy(x, labels))
    assert torch.equal(gradient(lambda x: training_loss(x, labels, teacher, 0.0, 2.0)), plain)
    assert not torch.allclose(gradient(lambda x: training_loss(x, labels, teacher, 1.0, 2.0)), plain, atol=1e-3)


def test_the_distillation_term_is_zero_only_when_the_predictions_agree():
    logits = torch.randn(4, 3)
    assert distill_loss(logits, logits, 2.0).abs() < 1e-6
    assert distill_loss(logits, logits + torch.tensor([3.0, 0.0, 0.0]), 2.0) > 0.01
    assert distill_loss(logits, logits + 5.0, 2.0).abs() < 1e-5  # a shift of all logits is the same distribution


def test_cached_teacher_logits_match_a_fresh_forward_pass(data, source):
    config = checkpoint.read_config(source)
    pre = Preprocessing.from_dict(config["preprocessing"])
    images = open_split(str(data), "train").decode(range(10), pre)
    cached = teacher_logits(source, config, images, pre, torch.device("cpu"), batch_size=4)
    teacher, _ = checkpoint.load_run(source)
    with torch.no_grad():
        fresh = teacher(pre.to_input(images.pixels))
    assert cached.shape == (10, 3)
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


def test_a_warm_start_loads_the_source_tensors_and_only_the_merge_refinement_starts_fresh(data, source, tmp_path):
    cfg = tiny_config(data, tmp_path / "fpet", init_from=str(source))
    run_config = {**checkpoint.read_config(source), "schedule": cfg.schedule}
    model = checkpoint.build_model(run_config)
    fresh = warm_start(model, source, run_config)
    assert fresh and all(".merger." in name for name in fresh)
    params = dict(model.named_parameters())
    for name, value in checkpoint.read_adapters(source).items():
        assert torch.equal(params[name], value), name


def test_training_with_a_warm_start_and_a_teacher_writes_a_run_that_records_them(data, source, tmp_path):
    logged = []
    cfg = tiny_config(data, tmp_path / "fpet", epochs=1, init_from=str(source), teacher=str(source))
    metrics = train(cfg, log=logged.append)
    assert any(line.startswith(f"started from {source}; new: ") for line in logged)
    assert any(line.startswith(f"teacher {source}: logits of the 24 training images") for line in logged)
    config = checkpoint.read_config(tmp_path / "fpet")
    assert config["train"]["init_from"] == str(source) and config["train"]["teacher"] == str(source)
    assert metrics["history"][0]["train_loss"] > 0


def test_a_warm_start_without_updates_keeps_the_source_tensors(data, source, tmp_path):
    """With a vanishing learning rate, what the run writes is what it started from: the source run."""
    cfg = tiny_config(
        data, tmp_path / "same", schedule="none", epochs=1, lr=1e-12, warmup_lr=1e-12, min_lr=0, init_from=str(source)
    )
    metrics = train(cfg, log=quiet)
    before = checkpoint.read_adapters(source)
    after = checkpoint.read_adapters(tmp_path / "same")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert metrics["val"]["last"] > 0


@pytest.mark.parametrize("flag", ["init_from", "teacher"])
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"seed": 1}, "was trained on other backbone weights"),
        ({"img_size": 48}, "was trained with --img-size 32, this run has 48"),
        ({"normalize": "imagenet"}, "was trained with --normalize none, this run has imagenet"),
    ],
)
def test_a_teacher_or_source_that_does_not_fit_is_a_one_line_error(data, source, tmp_path, flag, overrides, message):
    cfg = tiny_config(data, tmp_path / "run", **{flag: str(source)}, **overrides)
    with pytest.raises(FpetError) as error:
        train(cfg, log=quiet)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["init_from", "teacher"])
def test_other_labels_are_refused(data, source, tmp_path, flag):
    cfg = tiny_config(
        data,
        tmp_path / "run",
        label_groups=(("red", ("class_0",)), ("rest", ("class_1", "class_2"))),
        **{flag: str(source)},
    )
    with pytest.raises(FpetError, match="has labels"):
        train(cfg, log=quiet)


def test_a_warm_start_needs_the_same_pet_and_refuses_a_probe_head(data, source, tmp_path):
    with pytest.raises(FpetError, match="has another PET"):
        train(tiny_config(data, tmp_path / "a", method="lora", init_from=str(source)), log=quiet)
    with pytest.raises(FpetError, match="another PET"):
        train(tiny_config(data, tmp_path / "b", width=4, init_from=str(source)), log=quiet)
    with pytest.raises(FpetError, match="leave out --head-init probe"):
        train(tiny_config(data, tmp_path / "c", head_init="probe", init_from=str(source)), log=quiet)
    with pytest.raises(FpetError, match=r"--teacher: .* is not a complete run folder"):
        train(tiny_config(data, tmp_path / "d", teacher=str(tmp_path)), log=quiet)
    with pytest.raises(FpetError, match="--distill-temperature must be positive"):
        train(tiny_config(data, tmp_path / "e", teacher=str(source), distill_temperature=0), log=quiet)


def test_a_different_teacher_pet_is_fine(data, source, tmp_path):
    """A teacher only gives logits: another method or schedule is allowed."""
    cfg = tiny_config(data, tmp_path / "run", method="lora", epochs=1, teacher=str(source))
    assert train(cfg, log=quiet)["history"]
