"""Package boundaries (docs/design.md section 2): `metrics` imports neither `lightning_modules` nor
`datamodules`, so the evaluation code stands on its own; the one exception is `datamodules.chat`, the
chat-completions client that the chat judge shares with the chat question writer (issue 21)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "metrics"
ALLOWED = {"datamodules.chat"}


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_metrics_imports_only_downward(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    forbidden = {name for name in imported - ALLOWED
                 if name.split(".")[0] in {"lightning_modules", "datamodules", "main"}}
    assert not forbidden, forbidden
