import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fpet.errors import FpetError
from tests.helpers.tiny import make_image_folder, tiny_config
from training import checkpoint
from training.evaluate import evaluate_run
from training.loop import lr_at, train, wilson_interval


def interrupt_after_epoch(epoch: int):
    """A log callback that stops a three-epoch run as if killed once `epoch` is saved."""

    def log(message: str) -> None:
        if message.startswith(f"epoch {epoch}/3:"):
            raise KeyboardInterrupt

    return log


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("colours"))


def test_a_short_run_lowers_the_loss_and_writes_a_run_folder(data, tmp_path):
    metrics = train(tiny_config(data, tmp_path / "run", epochs=4), log=lambda _: None)
    losses = [row["train_loss"] for row in metrics["history"]]
    assert losses[-1] < losses[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "adapters.safetensors",
        "config.json",
        "labels.json",
        "metrics.json",
    ]
    assert metrics["val"]["best"] >= metrics["val"]["last"] > 0
    assert metrics["train_images_per_s"] > 0 and metrics["peak_memory_mb"] > 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["schedule"] == "6:0.5" and config["labels"] == ["class_0", "class_1", "class_2"]
    assert config["preprocessing"] == {
        "img_size": 32,
        "resize": "bicubic",
        "normalize": "none",
        "channels": "RGB",
        "scale": 1 / 255,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
    }
    assert {"torch", "fpet", "python"} <= set(config["software"])


def test_checkpoint_holds_only_trainable_tensors_and_round_trips(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run", epochs=1, method="lora", schedule="3:0.5,6:0.5", img_size=64)
    train(cfg, log=lambda _: None)
    tensors = load_file(tmp_path / "run" / "adapters.safetensors")
    assert all(".lora." in k or ".merger." in k or k.startswith("head.") for k in tensors)
    model, _ = checkpoint.load_run(tmp_path / "run")
    again, _ = checkpoint.load_run(tmp_path / "run")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    for name, value in tensors.items():
        assert torch.equal(dict(model.named_parameters())[name], value)


def test_evaluate_reproduces_the_reported_accuracy(data, tmp_path):
    metrics = train(tiny_config(data, tmp_path / "run", epochs=2), log=lambda _: None)
    result = evaluate_run(tmp_path / "run", str(data), split="val", device="cpu")
    assert result["accuracy"] == metrics["val"]["last"] and result["n"] == 12
    train(tiny_config(data, tmp_path / "noval", epochs=1, val_size=0), log=lambda _: None)
    with pytest.raises(FpetError, match="trained with no val images"):
        evaluate_run(tmp_path / "noval", str(data), split="val", device="cpu")


def test_resume_after_an_interruption_continues_from_the_saved_epoch(data, tmp_path):
    full = train(tiny_config(data, tmp_path / "full"), log=lambda _: None)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut"), log=interrupt_after_epoch(2))
    assert checkpoint.load_resume(tmp_path / "cut")["epoch"] == 2
    assert not (tmp_path / "cut" / "config.json").exists()
    with pytest.raises(FpetError, match="already holds a run"):
        train(tiny_config(data, tmp_path / "cut"), log=lambda _: None)
    with pytest.raises(FpetError, match=r"different settings \(lr\)"):
        train(tiny_config(data, tmp_path / "cut", resume=True, lr=0.1), log=lambda _: None)
    messages = []  # the same folders spelled differently are the same run
    resumed = train(tiny_config(f"{data}/", f"{tmp_path / 'cut'}/", resume=True), log=messages.append)
    assert "resuming" in messages[0] or any("resuming" in m and "epoch 2" in m for m in messages)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][-1]["train_loss"] == pytest.approx(full["history"][-1]["train_loss"], rel=1e-5)
    a, b = load_file(tmp_path / "full" / "adapters.safetensors"), load_file(tmp_path / "cut" / "adapters.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    assert not (tmp_path / "cut" / "resume.pt").exists()


def test_checksum_mismatch_and_newer_formats_are_refused(data, tmp_path):
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    from fpet.vit import create_model

    save_file(create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).state_dict(), weights)
    train(tiny_config(data, tmp_path / "run", epochs=1, weights=str(weights)), log=lambda _: None)
    checkpoint.load_run(tmp_path / "run")
    with open(weights, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(FpetError, match="refusing to combine them"):
        checkpoint.load_run(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FpetError, match="run format 99"):
        checkpoint.load_run(tmp_path / "run")
    (tmp_path / "run" / "adapters.safetensors").unlink()
    with pytest.raises(FpetError, match=r"missing adapters\.safetensors"):
        checkpoint.load_run(tmp_path / "run")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"img_size": 30}, "not a positive multiple of the patch size 16"),
        ({"schedule": "13:0.5"}, "block 13 does not exist"),
        ({"schedule": "tome:3"}, "can merge there"),
        ({"method": "prompt"}, "unknown method"),
        ({"weights": "nowhere.safetensors"}, "neither a known name"),
        ({"weights": "random", "backbone": None}, "--backbone is needed"),
        ({"train_size": 100}, "only 36"),
        ({"epochs": 0}, "at least 1"),
        ({"scale": float("nan")}, "--scale must be a finite number"),
        ({"min_lr": float("nan")}, "--min-lr must be a finite number"),
        ({"eval_batch_size": -1}, "--eval-batch-size must be at least 1"),
        ({"train_size": -5}, "--train-size must not be negative"),
        ({"lr": -1.0}, "--lr must be positive"),
        ({"drop_path": 1.5}, "--drop-path is a probability"),
    ],
)
def test_bad_settings_fail_before_training_and_write_nothing(data, tmp_path, overrides, message):
    with pytest.raises(FpetError, match=message):
        train(tiny_config(data, tmp_path / "run", **overrides), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_bad_data_fails_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FpetError, match="is empty"):
        train(tiny_config(tmp_path / "empty", tmp_path / "run"), log=lambda _: None)
    with pytest.raises(FpetError, match="does not exist"):
        train(tiny_config(tmp_path / "missing", tmp_path / "run"), log=lambda _: None)
    make_image_folder(tmp_path / "one", per_class=3)
    for extra in ("class_1", "class_2"):
        for f in (tmp_path / "one" / extra).iterdir():
            f.unlink()
        (tmp_path / "one" / extra).rmdir()
    with pytest.raises(FpetError, match="needs at least 2"):
        train(tiny_config(tmp_path / "one", tmp_path / "run", train_size=2, val_size=1), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_lr_schedule_warms_up_then_decays():
    cfg = tiny_config("x", "y", lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    assert lr_at(0, 100, 10, cfg) == pytest.approx(1e-6)
    assert lr_at(10, 100, 10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, 100, 10, cfg) == pytest.approx(1e-5)
    assert lr_at(55, 100, 10, cfg) == pytest.approx((1e-3 + 1e-5) / 2)


def test_wilson_interval():
    low, high = wilson_interval(900, 1000)
    assert low < 0.9 < high and high - low == pytest.approx(0.037, abs=0.002)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training(data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "cli.main",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--weights",
        "random",
        "--backbone",
        "vit_tiny_patch16_224",
        "--img-size",
        "32",
        "--train-size",
        "24",
        "--val-size",
        "12",
        "--no-test",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["history"]) == 2
    model, _ = checkpoint.load_run(out)
    assert set(load_file(out / "adapters.safetensors")) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_timm_weights_without_timm_are_a_clear_error():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(FpetError, match=r"needs timm: pip install 'fpet\[timm\]'"):
            checkpoint.read_weights(checkpoint.resolve_weights("timm:vit_small_patch16_224.augreg_in21k"))
    else:
        pytest.skip("timm is installed here")


def test_a_probe_head_classifies_before_any_fine_tuning(data, tmp_path):
    """With the learning rate at ~0 nothing but the head's initialisation can make the model right: the probe head
    gets the easy colour classes, the random head does not."""
    still = {"epochs": 1, "lr": 1e-12, "warmup_lr": 1e-12, "min_lr": 1e-12}
    probe = train(tiny_config(data, tmp_path / "probe", head_init="probe", **still), log=lambda _: None)
    random = train(tiny_config(data, tmp_path / "random", **still), log=lambda _: None)
    assert probe["val"]["last"] >= 0.9 > random["val"]["last"]
    config = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert config["train"]["head_init"] == "probe"
    with pytest.raises(FpetError, match="--head-init"):
        train(tiny_config(data, tmp_path / "bad", head_init="lp"), log=lambda _: None)


def test_resume_refuses_other_weights_under_the_same_file_name(data, tmp_path):
    from safetensors.torch import save_file

    from fpet.vit import create_model

    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).state_dict(), weights)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut", weights=str(weights)), log=interrupt_after_epoch(1))
    torch.manual_seed(1)
    save_file(create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).state_dict(), weights)
    with pytest.raises(FpetError, match=r"different settings \(backbone weights"):
        train(tiny_config(data, tmp_path / "cut", weights=str(weights), resume=True), log=lambda _: None)


def test_a_class_with_no_readable_image_is_refused_before_training(tmp_path):
    make_image_folder(tmp_path / "data", per_class=6)
    for image in (tmp_path / "data" / "class_1").iterdir():
        image.write_bytes(b"not an image")
    with pytest.raises(FpetError, match="no readable training images of class class_1"):
        train(tiny_config(tmp_path / "data", tmp_path / "run", train_size=12, val_size=6), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_damaged_run_files_are_one_line_errors(data, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut"), log=interrupt_after_epoch(1))
    resume = tmp_path / "cut" / "resume.pt"
    resume.write_bytes(resume.read_bytes()[:100])
    with pytest.raises(FpetError, match="damaged and cannot be resumed"):
        train(tiny_config(data, tmp_path / "cut", resume=True), log=lambda _: None)
    train(tiny_config(data, tmp_path / "run", epochs=1), log=lambda _: None)
    adapters = tmp_path / "run" / "adapters.safetensors"
    adapters.write_bytes(adapters.read_bytes()[:50])
    with pytest.raises(FpetError, match=r"adapters\.safetensors is damaged"):
        checkpoint.load_run(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(FpetError, match=r"config\.json is damaged"):
        checkpoint.load_run(tmp_path / "run")


def test_an_out_that_cannot_be_a_folder_fails_before_training(data, tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(FpetError, match="afile is not a folder"):
            train(tiny_config(data, out), log=lambda _: None)
    assert (tmp_path / "afile").read_text() == "x"
