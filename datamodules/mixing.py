"""The answerable/unanswerable mix: one rule for the DataModule (training time) and `assemble` (on disk)."""

from __future__ import annotations


def mix_sizes(answerable: int, unanswerable: int, fraction: float) -> tuple[int, int]:
    """How many answerable and unanswerable records a mix keeps so that a share `fraction` of it is
    unanswerable: the larger side is subsampled and the smaller one kept whole (0 and 1 keep one side).

    >>> mix_sizes(100, 30, 0.5), mix_sizes(10, 30, 0.5), mix_sizes(100, 30, 0.2)
    ((30, 30), (10, 10), (100, 25))
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"an unanswerable fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0:
        return answerable, 0
    if fraction == 1.0:
        return 0, unanswerable
    wanted = round(answerable * fraction / (1 - fraction))
    if wanted <= unanswerable:
        return answerable, wanted
    return round(unanswerable * (1 - fraction) / fraction), unanswerable
