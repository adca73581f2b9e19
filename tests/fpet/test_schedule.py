import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fpet.cost import model_macs
from fpet.describe import describe
from fpet.errors import FpetError
from fpet.schedule import MergePoint, MergeSchedule, parse_schedule, plan, tokens_per_block
from fpet.vit import create_model
from tests.helpers.tiny import TINY


@pytest.mark.parametrize(
    ("spec", "points"),
    [
        ("none", ()),
        ("", ()),
        ("6:0.5", (MergePoint(6, 0.5, "fpet"),)),
        ("fpet:6:0.5", (MergePoint(6, 0.5, "fpet"),)),
        ("3:0.5, 6:0.5,9:0.5", (MergePoint(3, 0.5), MergePoint(6, 0.5), MergePoint(9, 0.5))),
        ("3:0.5+6:0.5", (MergePoint(3, 0.5), MergePoint(6, 0.5))),
        ("tome:13", (MergePoint(None, 13, "tome"),)),
        ("tome:4:8", (MergePoint(4, 8, "tome"),)),
        ("2:10", (MergePoint(2, 10, "fpet"),)),
    ],
)
def test_parse(spec, points):
    schedule = parse_schedule(spec)
    assert schedule.points == points
    assert parse_schedule(schedule.spec) == schedule


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("6", "malformed"),
        ("6:0.5:1", "malformed"),
        ("x:0.5", "not a non-negative integer"),
        ("\u00b2:0.5", "not a non-negative integer"),  # "²" passes str.isdigit, not int()
        ("6:0.7", r"fraction must lie in \(0, 0.5\]"),
        ("6:abc", "neither a fraction"),
        ("6:0", "at least 1"),
        ("fpet:13", "malformed"),
    ],
)
def test_malformed_schedules_are_clear_errors(spec, message):
    with pytest.raises(FpetError, match=message):
        parse_schedule(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("12:0.5", "block 12 does not exist"),
        ("6:0.5,6:0.25", "more than one merge point"),
        ("tome:13,6:0.5", "more than one merge point"),
        ("0:99", "only 98 of the 197 tokens can merge"),
        ("0:0.5,1:0.5,2:0.5,3:0.5,4:0.5,5:0.5,6:0.5,7:0.5", "has 1 destination tokens besides cls; it needs 2"),
        ("tome:40", "can merge there"),
    ],
)
def test_schedules_that_do_not_fit_the_model(spec, message):
    with pytest.raises(FpetError, match=message):
        plan(parse_schedule(spec), 12, (14, 14))


def test_a_merge_may_not_leave_fewer_than_two_tokens():
    with pytest.raises(FpetError, match="fewer than 2 tokens"):
        plan(parse_schedule("tome:0:1"), 12, (1, 1))


def test_paper_setting_and_tome_token_counts():
    assert tokens_per_block(plan(parse_schedule("6:0.5"), 12, (14, 14)), (14, 14)) == [197] * 7 + [99] * 5
    counts = tokens_per_block(plan(parse_schedule("tome:13"), 12, (14, 14)), (14, 14))
    assert counts == [197 - 13 * i for i in range(12)]
    assert plan(MergeSchedule(), 12, (14, 14)) == [None] * 12


def test_gmacs_match_the_paper():
    none = describe("vit_base_patch16_224", method="full", schedule="none")
    fpet = describe("vit_base_patch16_224", method="full", schedule="6:0.5")
    assert none["gmacs"] == pytest.approx(17.56, abs=0.01)
    assert fpet["gmacs"] == pytest.approx(13.42, abs=0.03)
    assert fpet["tokens_per_block"][7] == 99


def observed_tokens(model, images):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("spec", ["none", "2:0.5", "0:0.5,2:0.5", "1:0.25,3:7", "tome:5", "tome:1:0.5,3:4"])
@pytest.mark.parametrize("method", ["adaptformer", "lora", "adaptformer-1bit", "full"])
def test_token_counts_and_macs_match_the_running_model(spec, method, images):
    model = create_model(TINY, num_classes=7, method=method, schedule=spec).eval().set_deploy()
    steps = plan(parse_schedule(spec), TINY.depth, (8, 8))
    assert observed_tokens(model, images) == tokens_per_block(steps, (8, 8))
    model.set_fused_attention(False)  # FlopCounterMode has no formula for the CPU fused kernel; the maths is equal
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images[:1])
    assert counter.get_total_flops() == 2 * model_macs(TINY, (8, 8), steps, model.pet, 7)


def test_describe_reports_params():
    info = describe("vit_small_patch16_224", method="adaptformer", schedule="6:0.5", num_classes=10)
    assert info["total_params"] > 21_000_000
    # adapters 12 * 2 * 384 * 8, head 384 * 10 + 10, refinement 2 * 64 * 32
    assert info["trainable_params"] == 12 * 2 * 384 * 8 + 3850 + 2 * 64 * 32
