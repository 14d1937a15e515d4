"""What a training batch's `labels` and `pair_segments` hold: the format the collator writes and the losses
and the DPO pass read. Standard library only, so that readers of the format import nothing else.
"""

from __future__ import annotations

import enum

IGNORE_INDEX = -100
"""The label of a position that is not scored (prompt, video and padding tokens), as in Hugging Face's
causal-LM losses."""


class Segment(enum.IntEnum):
    """What each position of a DPO pair row holds (`pair_segments`): a row is [prompt][chosen][rejected],
    left-padded. The values are the integers stored in the tensor."""

    PAD = 0
    PROMPT = 1
    CHOSEN = 2
    REJECTED = 3
