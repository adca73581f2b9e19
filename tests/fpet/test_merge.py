import pytest
import torch

from fpet import merge


def test_checkerboard_sets_have_the_right_sizes_and_membership():
    a, b = merge.checkerboard_split(14, 14)
    assert (len(a), len(b)) == (98, 99)
    assert b[0] == 0 and 0 not in a.tolist()
    assert sorted(a.tolist() + b.tolist()) == list(range(197))
    for idx in a.tolist():
        r, c = divmod(idx - 1, 14)
        assert (r + c) % 2 == 0
    for idx in b[1:].tolist():
        r, c = divmod(idx - 1, 14)
        assert (r + c) % 2 == 1
    a, b = merge.checkerboard_split(3, 5)
    assert (len(a), len(b)) == (8, 8)


def test_alternate_split_keeps_cls_in_b():
    a, b = merge.alternate_split(10)
    assert a.tolist() == [1, 3, 5, 7, 9] and b.tolist() == [0, 2, 4, 6, 8]


def test_similarity_masks_the_cls_column():
    metric = torch.randn(2, 17, 8)
    a, b = merge.checkerboard_split(4, 4)
    scores = merge.similarity(metric, a, b)
    assert scores.shape == (2, 8, 9)
    assert torch.isneginf(scores[..., 0]).all()
    assert scores[..., 1:].abs().max() <= 1 + 1e-6


def test_hard_assignment_is_one_hot_and_breaks_ties():
    scores = torch.tensor([[[float("-inf"), 0.5, 0.9, 0.9], [float("-inf"), 0.2, 0.1, 0.0]]])
    hard = merge.hard_assignment(scores)
    assert hard.tolist() == [[[0, 0, 1, 0], [0, 1, 0, 0]]]
    # FPET's own rule (soft > 0.5) would lose the tied row entirely
    m = scores.topk(2, dim=-1).values.mean(-1, keepdim=True)
    assert (torch.sigmoid(scores - m) > 0.5)[0, 0].sum() == 0
    assert (hard.sum(-1) == 1).all()


def test_fpet_assignment_is_hard_forward_and_soft_backward():
    scores = torch.randn(2, 5, 6, requires_grad=True)
    assign = merge.fpet_assignment(scores)
    torch.testing.assert_close(assign, merge.hard_assignment(scores))
    (assign * torch.randn_like(assign)).sum().backward()
    assert scores.grad.abs().sum() > 0


def merged_reference(x, size, a_idx, b_idx, assign):
    out_x, out_s = x[:, b_idx].clone(), size[:, b_idx].clone()
    for n in range(x.shape[0]):
        for j in range(len(b_idx)):
            members = [i for i in range(len(a_idx)) if assign[n, i, j] == 1]
            total = size[n, b_idx[j]] + sum(size[n, a_idx[i]] for i in members)
            acc = x[n, b_idx[j]] * size[n, b_idx[j]] + sum(x[n, a_idx[i]] * size[n, a_idx[i]] for i in members)
            out_x[n, j], out_s[n, j] = acc / total, total
    return out_x, out_s


@pytest.mark.parametrize("learned", [False, True])
def test_full_merge_is_the_size_weighted_mean_and_keeps_cls_first(learned):
    x, size = torch.randn(2, 17, 6), torch.randint(1, 4, (2, 17, 1)).float()
    a, b = merge.checkerboard_split(4, 4)
    scores = merge.similarity(torch.randn(2, 17, 5), a, b)
    out, new_size, _ = merge.merge_tokens(x, size, scores, a, b, k=len(a), learned=learned)
    ref_x, ref_s = merged_reference(x, size, a, b, merge.hard_assignment(scores))
    assert out.shape == (2, 9, 6)
    torch.testing.assert_close(out, ref_x)
    torch.testing.assert_close(new_size, ref_s)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # cls untouched, still first
    torch.testing.assert_close(new_size.sum(1), size.sum(1))


def test_partial_merge_merges_the_best_matched_rows_and_keeps_the_rest():
    x, size = torch.randn(1, 11, 4), torch.ones(1, 11, 1)
    a, b = merge.alternate_split(11)
    scores = merge.similarity(torch.randn(1, 11, 3), a, b)
    out, new_size, _ = merge.merge_tokens(x, size, scores, a, b, k=2, learned=False)
    assert out.shape == (1, 9, 4) and new_size.sum() == 11
    best = scores.max(-1).values[0]
    kept_rows = best.argsort(descending=True)[2:]
    kept_tokens = x[0, a[kept_rows]]
    torch.testing.assert_close(out[0, len(b) :], kept_tokens)
    torch.testing.assert_close(out[:, 0], x[:, 0])


def test_size_bias_is_log_size_per_key():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = merge.size_bias(size, torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.log(torch.tensor([1.0, 2.0, 4.0])))
