"""The documentation's generated reference pages match the code they are generated from."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "docs" / "reference" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["settings.md", "metrics.md", "cli.md"])
def test_a_generated_page_is_up_to_date(page):
    committed = (ROOT / "docs" / "reference" / page).read_text()
    assert committed == generator().PAGES[page](), f"docs/reference/{page} is stale: run docs/reference/generate.py"


def test_every_setting_flag_and_metric_is_on_its_page():
    from prometheus_client.metrics import MetricWrapperBase

    from cli.main import build_parser
    from service import metrics
    from service.settings import Settings

    module = generator()
    settings, metric_page, cli = module.settings_page(), module.metrics_page(), module.cli_page()
    assert all(f"`FPET_{name.upper()}`" in settings for name in Settings.model_fields)
    assert all(m._name in metric_page for m in vars(metrics).values() if isinstance(m, MetricWrapperBase))
    commands = module.command_parsers(build_parser())
    assert len(commands) >= 15 and all(f"## `{name}`" in cli for name, _, _ in commands)
    assert "`--max-delay-ms`" in settings and "`--min-speedup`" in cli
