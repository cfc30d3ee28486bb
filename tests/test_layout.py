"""docs/layout.md is the tree: every module of the app and the lab is listed there."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layout_lists_every_module_and_no_other():
    layout = (ROOT / "docs" / "layout.md").read_text()
    listed = set(re.findall(r"\b([a-z_0-9]+\.py)\b", layout))
    modules = {p.name for package in ("fedhpro_flwr", "fedhpro_lab")
               for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"}
    modules |= {"server_app.py", "client_app.py", "__init__.py"}  # the registry's __init__
    assert listed == modules
