import json
import os
import subprocess
import sys

import pytest

from cli.main import main


def test_describe_json(capsys):
    assert main(["describe", "--backbone", "vit_base_patch16_224", "--schedule", "6:0.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["tokens_per_block"]) == 12
    assert info["gmacs"] == pytest.approx(13.4, abs=0.1)
    assert info["gmacs_without_merging"] == pytest.approx(17.6, abs=0.1)
    assert {"trainable_params", "total_params", "ideal_speedup", "schedule"} <= set(info)


def test_describe_text(capsys):
    assert (
        main(["describe", "--backbone", "vit_small_patch14_dinov2", "--img-size", "112", "--schedule", "tome:4"]) == 0
    )
    out = capsys.readouterr().out
    assert "tokens per block: 65 61 57" in out and "GMACs" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["describe", "--schedule", "6:0.9"], "fraction must lie in"),
        (["describe", "--schedule", "0:0.5,1:0.5,2:0.5,3:0.5,4:0.5,5:0.5,6:0.5,7:0.5"], "destination tokens"),
        (["describe", "--backbone", "resnet50"], "unknown backbone 'resnet50'"),
        (["describe", "--img-size", "100"], "not a positive multiple of the patch size 16"),
        (["describe", "--method", "prompt"], "unknown method"),
    ],
)
def test_errors_are_one_line(args, message, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fpet: error: ") and message in err


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "fpet")
    done = subprocess.run([script, "describe", "--json"], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)["gmacs"] > 17


def test_the_command_needs_no_stage_until_one_runs():
    """The Docker build runs `fpet weights fetch` with only fpet, cli and training copied in (train's flags take
    TrainConfig's defaults): every other stage is imported inside the command that uses it, never at the top."""
    blocked = "import sys; sys.modules.update(dict.fromkeys(['bench', 'service', 'export'])); "
    code = blocked + "from cli.main import build_parser; build_parser().parse_args(['weights', 'list'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
