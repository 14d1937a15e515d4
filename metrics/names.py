"""The names of a test run's model groups, in metrics.json, predictions.jsonl and W&B keys.

A paired `test` run scores the model before alignment and after it on the same items: metrics.json is
``{"before": {score: value}, "after": {score: value}, "alignment": {excessive_refusal, ...}}`` (a single
model: ``{"after": {...}}``), and each predictions.jsonl row nests its model fields under "before" and
"after". Files written before these names (``f0``/``f1``/``paired``, a single model's scores flat) are read
through `current_metrics` and `current_rows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "AFTER",
    "ALIGNMENT",
    "BEFORE",
    "LEGACY_NAMES",
    "MODELS",
    "current_metrics",
    "current_rows",
    "summary_key",
]

BEFORE = "before"
"""The model before alignment (the base; with LoRA, the aligned model with its adapters disabled)."""
AFTER = "after"
"""The model after alignment (or the only model of a single-model run)."""
ALIGNMENT = "alignment"
"""The scores of the change before -> after: excessive_refusal, permissiveness, discretion."""
MODELS: tuple[str, str] = (BEFORE, AFTER)

LEGACY_NAMES: dict[str, str] = {"f0": BEFORE, "f1": AFTER, "paired": ALIGNMENT}
"""Earlier names of the three groups."""


def summary_key(prefix: str, group: str, score: str) -> str:
    """The W&B summary key of a score: ``test/after/answerable_accuracy``, ``test/alignment/discretion``."""
    return f"{prefix}/{group}/{score}"


def current_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Metrics with the current group names (renamed from f0/f1/paired); flat scores as ``{"after": ...}``."""
    groups = {LEGACY_NAMES.get(k, k): v for k, v in metrics.items() if isinstance(v, Mapping)}
    if AFTER not in groups:
        flat = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
        return {AFTER: flat}
    return {k: dict(v) for k, v in groups.items()}


def current_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Prediction rows with the model fields of a paired row under "before"/"after" (renamed from f0/f1)."""
    return [
        {LEGACY_NAMES.get(k, k) if isinstance(v, Mapping) else k: v for k, v in row.items()} for row in rows
    ]
