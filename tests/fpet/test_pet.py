import pytest
import torch

from fpet.errors import FpetError
from fpet.pet import PetConfig, binarize, load_trainable_state_dict, trainable_state_dict
from fpet.vit import create_model
from tests.helpers.tiny import TINY, TINY_LS


@pytest.mark.parametrize("method", ["adaptformer-1bit", "lora-1bit"])
def test_one_bit_layers_carry_two_values_per_tensor(method):
    model = create_model(TINY, method=method, schedule="2:0.5")
    binary = [m for m in model.modules() if type(m).__name__ == "BinaryLinear"]
    assert binary
    for layer in binary:
        values = torch.unique(binarize(layer.weight.detach()))
        assert len(values) == 2, layer


def test_binarize_passes_gradients_straight_through():
    w = torch.randn(4, 4, requires_grad=True)
    (binarize(w) * torch.arange(16.0).reshape(4, 4)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(16.0).reshape(4, 4))


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("linear", {"head.weight", "head.bias"}),
        (
            "adaptformer",
            {"head.weight", "head.bias"} | {f"blocks.{i}.adapter.{p}.weight" for i in range(4) for p in ("down", "up")},
        ),
        (
            "lora",
            {"head.weight", "head.bias"}
            | {f"blocks.{i}.attn.lora.{p}.weight" for i in range(4) for p in ("q_down", "q_up", "v_down", "v_up")},
        ),
    ],
)
def test_each_method_trains_its_modules_and_the_head(method, expected):
    model = create_model(TINY, num_classes=3, method=method)
    assert set(trainable_state_dict(model)) == expected


def test_full_finetuning_trains_everything_and_merges_add_refiners():
    model = create_model(TINY, method="full")
    assert all(p.requires_grad for p in model.parameters())
    model = create_model(TINY, method="linear", schedule="1:0.5")
    assert {k for k in trainable_state_dict(model) if "merger" in k} == {
        "blocks.1.merger.refine.down.weight",
        "blocks.1.merger.refine.up.weight",
    }


def test_trainable_state_dict_round_trips(images):
    model = create_model(TINY, num_classes=3, method="lora", schedule="2:0.5").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    tensors = trainable_state_dict(model)
    fresh = create_model(TINY, num_classes=3, method="lora", schedule="2:0.5").eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in tensors}, strict=False)
    load_trainable_state_dict(fresh, tensors)
    with torch.no_grad():
        assert torch.equal(model(images), fresh(images))
    with pytest.raises(FpetError, match="missing"):
        load_trainable_state_dict(fresh, {k: v for k, v in tensors.items() if "head" not in k})


@pytest.mark.parametrize("method", ["lora", "lora-1bit"])
def test_lora_folds_into_qkv_exactly(method, images):
    model = create_model(TINY, num_classes=3, method=method).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(std=0.1)
        before = model(images)
        model.fold_lora()
        assert not any("lora" in k for k in model.state_dict())
        torch.testing.assert_close(model(images), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["adaptformer", "lora"])
def test_deployment_form_folds_layer_scale_exactly(method, images):
    model = create_model(TINY_LS, num_classes=3, method=method, schedule="1:0.5").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.uniform_(0.5, 2.0)  # far from the 1e-5 init, so a dropped or misplaced scale shows
        before = model(images)
        model.freeze_for_deployment()
        assert not any("gamma" in k for k in model.state_dict())
        torch.testing.assert_close(model(images), before, atol=1e-5, rtol=1e-5)


def test_unknown_method_is_an_error():
    with pytest.raises(FpetError, match="unknown method 'vpt'"):
        PetConfig("vpt")
