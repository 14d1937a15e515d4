"""Package boundaries (docs/design.md section 2): `metrics` imports only downward, `datamodules` (the
record files, categories and gold refusal, defined once there) and never `lightning_modules` or `main`; and
inside it every score is named once, in `metrics.names`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "metrics"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_metrics_imports_only_downward(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"lightning_modules", "main"}, imported


def _score_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in `path` that is a score key or a key below one
    (``<score>/<category>``, ``<score>/denominator``), docstrings and ``__all__`` aside."""
    from metrics.names import SCORES

    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skipped.add(id(node.value))  # a docstring (its doctests show computed keys as output)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            skipped |= {id(element) for element in ast.walk(node.value)}  # the function answerability_auroc
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped
        and node.value.split("/")[0] in SCORES
    ]


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_score_keys_are_spelled_only_in_names(path):
    """A new score is one edit: every other module reads its key from `metrics.names`."""
    texts = [text for _, text in _score_literals(path)]
    if path.name == "names.py":
        assert texts and len(texts) == len(set(texts)), texts
    else:
        assert texts == [], _score_literals(path)


def test_the_metrics_compute_exactly_the_registered_scores_in_report_order():
    import torch

    from metrics.answerability import AnswerabilityAUROC, AnswerabilityMetrics, PairedAnswerabilityMetrics
    from metrics.names import ALIGNMENT_SCORES, SCORE_KEYS

    flags = torch.tensor([True, False, True, False])
    single = AnswerabilityMetrics()
    single.update(flags, flags, torch.tensor([True, True, False, False]), torch.tensor([-1, -1, 0, 1]), flags)
    auroc = AnswerabilityAUROC()
    auroc.update(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([True, True, False, False]),
                 torch.tensor([-1, -1, 0, 1]))
    assert [*single.compute(), *auroc.compute()] == list(SCORE_KEYS)
    paired = PairedAnswerabilityMetrics()
    paired.update(flags, flags, ~flags, flags, torch.tensor([True, True, False, False]))
    assert list(paired.compute()) == [key for s in ALIGNMENT_SCORES for key in (s.key, s.denominator_key)]
