"""The index templates under infra/elasticsearch/templates are what the code creates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_template_files_match_the_projection_schemas() -> None:
    spec = importlib.util.spec_from_file_location(
        "write_templates", ROOT / "infra" / "elasticsearch" / "write_templates.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered: dict[str, str] = module.render("orderstream-")
    assert rendered, "no projection has a template"
    for name, text in rendered.items():
        path = ROOT / "infra" / "elasticsearch" / "templates" / name
        assert path.exists(), f"{path} is missing: run python infra/elasticsearch/write_templates.py"
        assert path.read_text() == text, f"{path} is stale: run python infra/elasticsearch/write_templates.py"
