"""Merge maps: which original patches each token holds after each merge point, from the model and the bundle."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fpet import mergemap
from fpet.vit import create_model
from tests.helpers.servers import run_fpet
from tests.helpers.tiny import TINY


def sizes_before_each_block(model, images):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[1])) for b in model.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("spec", ["1:0.5", "0:0.5,2:0.5", "tome:5", "1:0.25,tome:3:4"])
def test_maps_hold_the_sizes_the_model_merged_with_and_logits_are_unchanged(spec, images):
    model = create_model(TINY, num_classes=3, method="adaptformer", schedule=spec).eval().set_deploy()
    with torch.no_grad():
        logits, maps = model.forward_explained(images)
        assert torch.equal(logits, model(images))
    steps = [s for s in model.merge_plan() if s is not None]
    assert maps.shape == (len(images), len(steps), 64)
    sizes = sizes_before_each_block(model, images)
    for j, step in enumerate(steps):
        after = sizes[step.block + 1] if step.block + 1 < len(sizes) else None
        for b in range(len(images)):
            counts = np.bincount(maps[b, j].numpy(), minlength=step.tokens_in - step.merged)
            assert counts[0] == 0 and len(counts) == step.tokens_in - step.merged  # cls holds no patch
            if after is not None:
                assert counts[1:].tolist() == after[b, 1:, 0].int().tolist()
            if j:  # a later point only joins groups of an earlier one
                for group in mergemap.groups_of(maps[b, j - 1].numpy()):
                    assert len(set(maps[b, j, group].tolist())) == 1


def test_a_model_without_merges_has_no_maps(images):
    model = create_model(TINY, num_classes=3).eval()
    assert model.forward_explained(images)[1].shape == (3, 0, 64)


def test_groups_and_drawing():
    row = np.array([2, 2, 1, 3])
    assert mergemap.groups_of(row) == [[2], [0, 1], [3]]
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[:2, :2] = 200  # patch 0 bright, patch 1 dark: their merged group is filled with the mean
    picture = np.asarray(mergemap.draw(pixels, row, (2, 2), scale=4))
    assert picture.shape == (16, 16, 3)
    assert tuple(picture[2, 2]) == (100, 100, 100) and tuple(picture[2, 13]) == (100, 100, 100)
    assert tuple(picture[8, 2]) == (255, 255, 255)  # the border between the top groups and patch 2's
    plan = mergemap.plan_json(row[None], [{"block": 6, "method": "fpet", "tokens_before": 5, "tokens_after": 4}])
    assert plan == [{"block": 6, "method": "fpet", "tokens_before": 5, "tokens_after": 4, "groups": [[2], [0, 1], [3]]}]


def test_the_bundle_maps_equal_pytorch_and_visualize_draws_them(tmp_path, tiny_bundles):
    manifest = json.loads((tiny_bundles["fpet"] / "manifest.json").read_text())
    assert manifest["merge_maps"]["points"][0]["block"] == 6
    assert manifest["verification"]["formats"]["onnx"]["merge_maps"]["images_identical"] == 1.0
    assert json.loads((tiny_bundles["backbone"] / "manifest.json").read_text())["merge_maps"] is None
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(image)
    result = run_fpet(
        "visualize", str(tiny_bundles["fpet"]), str(image), "--out", str(tmp_path / "maps"), home=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["photo_block6.png", "photo_sheet.png"]
    assert Image.open(tmp_path / "maps" / "photo_block6.png").size == (64 * 3, 64 * 3)
    sheet = Image.open(tmp_path / "maps" / "photo_sheet.png")
    assert sheet.width > 2 * 64 * 3
    bad = run_fpet("visualize", str(tiny_bundles["backbone"]), str(image), home=tmp_path)
    assert bad.returncode != 0 and "merges no tokens" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "b").mkdir()  # two images of one name from two folders: each keeps its own maps
    Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8)).save(tmp_path / "b" / "photo.png")
    twice = run_fpet(
        "visualize",
        str(tiny_bundles["fpet"]),
        str(image),
        str(tmp_path / "b" / "photo.png"),
        "--out",
        str(tmp_path / "twice"),
        home=tmp_path,
    )
    assert twice.returncode == 0, twice.stderr
    assert sorted(p.name for p in (tmp_path / "twice").iterdir()) == [
        "photo-2_block6.png",
        "photo-2_sheet.png",
        "photo_block6.png",
        "photo_sheet.png",
    ]
