import pytest
import torch

from fpet.schedule import MergeStep
from fpet.trr import TokenMerger
from fpet.vit import create_model
from tests.helpers.tiny import TINY


def test_straight_through_trains_the_refinement_adapter_and_not_the_keys():
    merger = TokenMerger("fpet", head_dim=8).train()
    step = MergeStep(block=0, method="fpet", tokens_in=17, n_a=8, n_b=9, merged=8, grid=(4, 4))
    x = torch.randn(2, 17, 16, requires_grad=True)
    keys = torch.randn(2, 17, 8, requires_grad=True)
    out, _, _ = merger(x, torch.ones(2, 17, 1), keys, step)
    (out * torch.randn_like(out)).sum().backward()
    assert keys.grad is None  # the metric is detached
    assert merger.refine.down.weight.grad.abs().sum() > 0
    assert merger.refine.up.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_pet_modules_and_merges_get_gradients_frozen_weights_do_not(images):
    model = create_model(TINY, num_classes=3, method="adaptformer-1bit", schedule="1:0.5,2:0.5").train()
    model(images).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".merger.refine." in n for n in trained) and any(".adapter." in n for n in trained)
    assert "head.weight" in trained and "blocks.0.attn.qkv.weight" not in trained


def reference_merge(x, size, metric, a_idx, b_idx, k):
    """Bipartite merging written out token by token, independently of fpet.merge: every A token finds its most
    similar B token (cosine, never cls); the k A tokens with the strongest matches are folded into their matches
    as size-weighted means; the other A tokens follow the B tokens, strongest match first."""
    unit = [v / max(float(v.norm()), 1e-6) for v in metric]
    best = {}
    for i in a_idx:
        candidates = [(float(unit[i] @ unit[j]), pos) for pos, j in enumerate(b_idx) if pos > 0]
        best[i] = max(candidates)
    ranked = sorted(a_idx, key=lambda i: -best[i][0])
    sums = [x[j] * size[j] for j in b_idx]
    sizes = [size[j].clone() for j in b_idx]
    for i in ranked[:k]:
        pos = best[i][1]
        sums[pos] = sums[pos] + x[i] * size[i]
        sizes[pos] = sizes[pos] + size[i]
    tokens = [s / n for s, n in zip(sums, sizes, strict=True)] + [x[i] for i in ranked[k:]]
    return torch.stack(tokens), torch.stack(sizes + [size[i] for i in ranked[k:]])


STEPS = [
    MergeStep(block=0, method="fpet", tokens_in=17, n_a=8, n_b=9, merged=8, grid=(4, 4)),
    MergeStep(block=0, method="fpet", tokens_in=17, n_a=8, n_b=9, merged=3, grid=(4, 4)),
    MergeStep(block=0, method="tome", tokens_in=17, n_a=8, n_b=9, merged=5, grid=None),
]


@pytest.mark.parametrize("deploy", [False, True])
@pytest.mark.parametrize("method", ["fpet", "tome"])
@pytest.mark.parametrize("step", STEPS, ids=["checkerboard-all", "checkerboard-3", "alternate-5"])
def test_merging_matches_a_token_by_token_reference(method, step, deploy):
    """Tie-free random tokens, in training form (eval) and in deployment form."""
    merger = TokenMerger(method, head_dim=8).eval()
    merger.deploy = deploy
    x, keys = torch.randn(2, 17, 16), torch.randn(2, 17, 8)
    size = torch.randint(1, 4, (2, 17, 1)).float()
    with torch.no_grad():
        out, out_size, _ = merger(x, size, keys, step)
        metric = keys if merger.refine is None else keys + merger.refine(keys)
    if step.grid is not None:
        cells = [(1 + r * 4 + c, (r + c) % 2 == 0) for r in range(4) for c in range(4)]
        a_idx, b_idx = [i for i, even in cells if even], [0] + [i for i, even in cells if not even]
    else:
        a_idx, b_idx = list(range(1, 17, 2)), list(range(0, 17, 2))
    for b in range(2):
        expected, expected_size = reference_merge(x[b], size[b], metric[b], a_idx, b_idx, step.merged)
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_size[b], expected_size)


def tied_images(n: int) -> torch.Tensor:
    """Images built from repeated 4x4 patches, so many patch tokens (and their keys) are exactly equal."""
    tiles = torch.randn(n, 3, 3, 4, 4)
    choice = torch.randint(0, 3, (n, 8, 8))
    patches = tiles[torch.arange(n)[:, None, None], choice]  # n, 8, 8, 3, 4, 4
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, 32, 32)


@pytest.mark.parametrize("schedule", ["2:0.5", "1:0.5,2:0.25,3:3", "tome:4", "1:0.5,tome:2:5"])
def test_deployment_mode_matches_training_mode_in_eval(schedule):
    model = create_model(TINY, num_classes=5, method="adaptformer", schedule=schedule).eval()
    with torch.no_grad():
        model.pos_embed.zero_()  # with no position signal, repeated patches give exact ties
        for inputs in (torch.randn(4, 3, 32, 32), tied_images(4), tied_images(4) + 1e-7 * torch.randn(4, 3, 32, 32)):
            train_path = model.set_deploy(False)(inputs)
            deploy_path = model.set_deploy(True)(inputs)
            torch.testing.assert_close(deploy_path, train_path, atol=1e-5, rtol=1e-5)
            assert torch.isfinite(deploy_path).all()
