import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fpet.errors import FpetError
from fpet.vit import create_model
from fpet.weights import convert_google_npz, load_backbone, read_state_dict
from tests.helpers.tiny import TINY, TINY_LS


def reference_vit(sd: dict, x: torch.Tensor, heads: int, patch: int, layer_scale: bool) -> torch.Tensor:
    """A plain ViT written independently of fpet (torch's own attention kernel), from a timm-layout state dict."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, t.shape[-1:], sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        a = F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + (a * sd[p + "ls1.gamma"] if layer_scale else a)
        h = F.layer_norm(t, t.shape[-1:], sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        t = t + (h * sd[p + "ls2.gamma"] if layer_scale else h)
    t = F.layer_norm(t, t.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("cfg", [TINY, TINY_LS])
@pytest.mark.parametrize("method", ["full", "adaptformer", "lora"])
def test_without_merges_the_model_is_a_plain_vit(cfg, method, images):
    model = create_model(cfg, num_classes=5, method=method).eval()
    if cfg.layer_scale:
        for block in model.blocks:
            torch.nn.init.uniform_(block.ls1.gamma, 0.5, 1.5)
            torch.nn.init.uniform_(block.ls2.gamma, 0.5, 1.5)
    plain = {k: v for k, v in model.state_dict().items() if ".adapter." not in k and ".lora." not in k}
    with torch.no_grad():
        expected = reference_vit(plain, images, cfg.num_heads, cfg.patch_size, cfg.layer_scale)
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)


def test_state_dict_uses_timm_layout():
    keys = set(create_model("vit_small_patch14_dinov2", num_classes=10, img_size=224).state_dict())
    for k in [
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.ls1.gamma",
        "blocks.0.norm2.bias",
        "blocks.0.mlp.fc1.weight",
        "blocks.11.mlp.fc2.bias",
        "blocks.11.ls2.gamma",
        "norm.weight",
        "head.weight",
    ]:
        assert k in keys
    assert not any("ls1" in k for k in create_model("vit_tiny_patch16_224").state_dict())


def test_state_dict_round_trips_through_safetensors(tmp_path, images):
    model = create_model(TINY, num_classes=4).eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    fresh = create_model(TINY, num_classes=4).eval()
    load_backbone(fresh, read_state_dict(tmp_path / "w.safetensors"))
    with torch.no_grad():
        assert torch.equal(model(images), fresh(images))
    assert set(load_file(tmp_path / "w.safetensors")) == set(model.state_dict())


def test_pth_loads_tensors_and_refuses_pickled_objects(tmp_path):
    model = create_model(TINY, num_classes=4)
    torch.save({"model": model.state_dict()}, tmp_path / "ok.pth")
    assert set(read_state_dict(tmp_path / "ok.pth")) == set(model.state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(FpetError, match="refusing to unpickle"):
        read_state_dict(tmp_path / "evil.pth")


def to_google_npz(sd: dict, heads: int) -> dict:
    """The inverse of convert_google_npz, to check the conversion on a known state dict."""
    n = lambda t: t.detach().numpy()  # noqa: E731
    dim = sd["cls_token"].shape[-1]
    out = {
        "embedding/kernel": n(sd["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
        "embedding/bias": n(sd["patch_embed.proj.bias"]),
        "cls": n(sd["cls_token"]),
        "Transformer/posembed_input/pos_embedding": n(sd["pos_embed"]),
        "Transformer/encoder_norm/scale": n(sd["norm.weight"]),
        "Transformer/encoder_norm/bias": n(sd["norm.bias"]),
        "head/kernel": n(sd["head.weight"]).T,
        "head/bias": n(sd["head.bias"]),
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        att = g + "MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            w = n(sd[p + "attn.qkv.weight"])[j * dim : (j + 1) * dim]
            out[att + f"{name}/kernel"] = w.T.reshape(dim, heads, -1)
            out[att + f"{name}/bias"] = n(sd[p + "attn.qkv.bias"])[j * dim : (j + 1) * dim].reshape(heads, -1)
        out[att + "out/kernel"] = n(sd[p + "attn.proj.weight"]).T.reshape(heads, -1, dim)
        out[att + "out/bias"] = n(sd[p + "attn.proj.bias"])
        for j, name in ((0, "norm1"), (2, "norm2")):
            out[g + f"LayerNorm_{j}/scale"], out[g + f"LayerNorm_{j}/bias"] = (
                n(sd[p + name + ".weight"]),
                n(sd[p + name + ".bias"]),
            )
        for j in (0, 1):
            out[g + f"MlpBlock_3/Dense_{j}/kernel"] = n(sd[p + f"mlp.fc{j + 1}.weight"]).T
            out[g + f"MlpBlock_3/Dense_{j}/bias"] = n(sd[p + f"mlp.fc{j + 1}.bias"])
        i += 1
    return out


def test_google_npz_converts_to_the_same_weights(tmp_path, images):
    model = create_model(TINY, num_classes=4).eval()
    np.savez(tmp_path / "vit.npz", **to_google_npz(model.state_dict(), TINY.num_heads))
    fresh = create_model(TINY, num_classes=4).eval()
    load_backbone(fresh, read_state_dict(tmp_path / "vit.npz"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images), atol=1e-6, rtol=1e-6)
    with pytest.raises(FpetError, match="not a Google ViT"):
        convert_google_npz({"foo": np.zeros(1)})
    partial = to_google_npz(model.state_dict(), TINY.num_heads)
    del partial["cls"]
    np.savez(tmp_path / "partial.npz", **partial)
    with pytest.raises(FpetError, match="not a complete Google ViT checkpoint: it lacks 'cls'"):
        read_state_dict(tmp_path / "partial.npz")


def test_foreign_position_grid_is_resampled_and_head_dropped():
    source = create_model(TINY, num_classes=7)  # 8x8 grid
    target = create_model(TINY, num_classes=3, img_size=48)  # 12x12 grid
    missing = load_backbone(target, source.state_dict())
    assert target.pos_embed.shape == (1, 145, 32)
    assert missing == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])


def test_missing_backbone_tensors_are_an_error():
    sd = create_model(TINY).state_dict()
    del sd["blocks.1.mlp.fc1.weight"]
    with pytest.raises(FpetError, match=r"missing \['blocks.1.mlp.fc1.weight'\]"):
        load_backbone(create_model(TINY), sd)


def test_any_input_size_divisible_by_the_patch(images):
    model = create_model(TINY, num_classes=3, method="adaptformer", schedule="2:0.5").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 24, 40)).shape == (2, 3)
    with pytest.raises(FpetError, match="not a positive multiple of the patch size 4"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(FpetError, match="multiple of the patch size"):
        create_model(TINY, img_size=30)


def test_weights_digest_depends_on_the_tensors_not_the_file(tmp_path):
    from fpet.weights import sha256_file, tensors_sha256

    sd = create_model(TINY).state_dict()
    save_file(sd, tmp_path / "a.safetensors", metadata={"x": "1", "y": "2"})
    torch.save(sd, tmp_path / "b.pth")
    digests = {tensors_sha256(read_state_dict(tmp_path / name)) for name in ("a.safetensors", "b.pth")}
    assert len(digests) == 1 and sha256_file(tmp_path / "a.safetensors") != sha256_file(tmp_path / "b.pth")
    sd["norm.bias"] = sd["norm.bias"] + 1e-3
    assert tensors_sha256(sd) not in digests


@pytest.mark.parametrize("schedule", ["none", "tome:1", "1:0.5+2:0.5"])
@pytest.mark.parametrize("training", [False, True])
def test_fused_attention_equals_the_explicit_form(schedule, training, images):
    """scaled_dot_product_attention with the log-size bias as a float mask is the same maths as the written-out
    softmax, with and without merges (the bias only exists after one), in training (gradients too) and in eval."""
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=5, method="adaptformer", schedule=schedule).train(training)
    outputs, grads = [], []
    for fused in (True, False):
        model.set_fused_attention(fused).zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both passes
        out = model(images)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert all(block.attn.fused is False for block in model.blocks)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_runs_fused_attention_with_the_size_mask(images):
    model = create_model(TINY, num_classes=5, method="adaptformer", schedule="1:0.5+2:0.5").eval()
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert low.shape == reference.shape and torch.isfinite(low).all()
