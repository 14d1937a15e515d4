"""The names of a test run's model groups, in metrics.json, predictions.jsonl and W&B keys.

A paired `test` run scores the model before alignment and after it on the same items: metrics.json is
``{"before": {score: value}, "after": {score: value}, "alignment": {excessive_refusal, ...}}`` (a single
model: ``{"after": {...}}``), and each predictions.jsonl row nests its model fields under "before" and
"after" (a single model's rows are flat).
"""

from __future__ import annotations

__all__ = [
    "AFTER",
    "ALIGNMENT",
    "BEFORE",
    "MODELS",
    "summary_key",
]

BEFORE = "before"
"""The model before alignment (the base; with LoRA, the aligned model with its adapters disabled)."""
AFTER = "after"
"""The model after alignment (or the only model of a single-model run)."""
ALIGNMENT = "alignment"
"""The scores of the change before -> after: excessive_refusal, permissiveness, discretion."""
MODELS: tuple[str, str] = (BEFORE, AFTER)



def summary_key(prefix: str, group: str, score: str) -> str:
    """The W&B summary key of a score: ``test/after/answerable_accuracy``, ``test/alignment/discretion``."""
    return f"{prefix}/{group}/{score}"
