"""Alignment losses as pure tensor functions: causal-LM sequence log-probabilities (of single rows, and of
the chosen and rejected responses of a shared-prefix pair row), the SFT loss, the pairwise preference losses
(DPO / cDPO, IPO, hinge, robust DPO) and an SFT term on the chosen response. Nothing here touches a model,
so every formula is unit-tested on hand-made numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.batch_format import Segment

__all__ = [
    "LOSS_TYPES",
    "chosen_nll",
    "dpo_with_sft",
    "pair_logps",
    "preference_loss",
    "sequence_logps",
    "sft_loss",
]

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")
"""Accepted values of ``preference_loss(loss_type=...)``."""

_SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed log-probabilities of the unmasked label tokens of each sequence, and their count.

    The standard causal shift is applied, as in Hugging Face causal-LM losses and TRL: the logits at
    position ``t`` predict the label at position ``t + 1``, so ``logits[:, :-1]`` are scored against
    ``labels[:, 1:]`` and ``labels[:, 0]`` is never counted. For sequence ``b``::

        logps[b] = sum_{t : labels[b, t+1] != ignore_index} log_softmax(logits[b, t])[labels[b, t+1]]
        counts[b] = #{t : labels[b, t+1] != ignore_index}

    Memory: only the rows of ``logits`` whose next label is unmasked are gathered (for a video-LLM the
    prompt and video tokens, usually most of the sequence, are skipped) and ``log_softmax`` runs on
    those rows alone, upcast to float32 when the logits are half precision. A sequence with no unmasked
    token gets ``logps = 0`` and ``counts = 0``.

    Args:
        logits: ``(batch, seq_len, vocab)`` model outputs.
        labels: ``(batch, seq_len)`` token ids, ``ignore_index`` on prompt, video and padding tokens.
        ignore_index: label value that is not scored.

    Returns:
        ``(logps, counts)``: ``(batch,)`` float tensor (float32, or float64 for float64 logits) that
        carries the gradient to ``logits``, and ``(batch,)`` int64 token counts.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, seq_len, vocab), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the logits' (batch, seq_len) "
            f"{tuple(logits.shape[:2])}"
        )
    batch = logits.shape[0]
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)

    shift_labels = labels[:, 1:]
    mask = shift_labels != ignore_index
    rows, cols = mask.nonzero(as_tuple=True)
    # (n_tokens, vocab): only the positions that are scored, never the whole sequence.
    selected = logits[:, :-1][rows, cols].to(compute_dtype)
    targets = shift_labels[rows, cols]
    token_logps = torch.log_softmax(selected, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    logps = torch.zeros(batch, dtype=compute_dtype, device=logits.device).index_add(0, rows, token_logps)
    counts = mask.sum(dim=-1)
    return logps, counts


def pair_logps(
    logits: Tensor, labels: Tensor, segments: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """:func:`sequence_logps` of the chosen and the rejected response of shared-prefix pair rows.

    A pair row is ``[prompt][chosen][rejected]`` (left padding first), with ``segments`` marking each
    position ``Segment.PAD`` (0), ``Segment.PROMPT`` (1), ``Segment.CHOSEN`` (2) or ``Segment.REJECTED``
    (3) (``datamodules.batch_format``), and the logits come from a pass in which the rejected tokens do not
    see the chosen ones. A label at position ``t`` is scored by the logits at ``t - 1``, except the first
    rejected token, which is scored by the logits of the last prompt token (in ``[prompt][rejected]`` they
    are the position before it). So, for each row ``b``, the results equal :func:`sequence_logps` of the
    rows ``[prompt][chosen]`` and ``[prompt][rejected]``.

    Returns:
        ``(logps, counts)``, each ``(2 * batch,)``: the chosen responses' first, then the rejected ones'
        (the layout of two-row pairs), with the dtypes of :func:`sequence_logps`.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or segments.shape != labels.shape:
        raise ValueError(
            f"logits (batch, seq_len, vocab), labels and segments (batch, seq_len) expected, got shapes "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(segments.shape)}"
        )
    batch, length = labels.shape
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    mask = labels != ignore_index
    mask[:, 0] = False  # as in sequence_logps: the first position has no logits before it
    rows, cols = mask.nonzero(as_tuple=True)
    positions = torch.arange(length, device=labels.device)
    prompt_last = torch.where(segments == Segment.PROMPT, positions, -1).amax(dim=1)
    rejected = segments[rows, cols] == Segment.REJECTED
    first_rejected = rejected & (segments[rows, cols - 1] != Segment.REJECTED)
    sources = torch.where(first_rejected, prompt_last[rows], cols - 1)
    if bool((sources < 0).any()):
        raise ValueError("a pair row has a rejected response but no prompt token before it")
    selected = logits[rows, sources].to(compute_dtype)
    targets = labels[rows, cols]
    token_logps = torch.log_softmax(selected, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    bins = rows + batch * rejected.long()
    logps = torch.zeros(2 * batch, dtype=compute_dtype, device=logits.device).index_add(0, bins, token_logps)
    counts = torch.zeros(2 * batch, dtype=torch.long, device=labels.device).index_add(
        0, bins, torch.ones_like(bins)
    )
    return logps, counts


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """Supervised fine-tuning loss: the negative log-likelihood of the response tokens, a token-level mean.

    Returns ``(loss, nll, tokens)``: ``nll`` is the summed negative log-likelihood of the batch's response
    tokens, ``tokens`` their number and ``loss = nll / max(tokens, 1)``, like Hugging Face's causal-LM loss
    (``cross_entropy(..., ignore_index)`` over the shifted logits and labels), so long responses weigh more
    than short ones::

        nll = -sum_b logps[b],  tokens = sum_b counts[b]        with (logps, counts) = sequence_logps(...)

    Over a gradient-accumulation window the loss is ``sum(nll) / sum(tokens)`` of its micro-batches (on all
    ranks), not the mean of their ``loss``: training backpropagates ``nll`` and divides the gradients by the
    window's tokens, as transformers' Trainer and TRL do.

    Only tokens whose label is not ``ignore_index`` count: prompt, video and padding tokens are masked
    by the caller. A batch with no response token has ``loss = 0`` (still attached to the graph) rather
    than NaN.
    """
    logps, counts = sequence_logps(logits, labels, ignore_index=ignore_index)
    nll, tokens = -logps.sum(), counts.sum()
    return nll / tokens.clamp(min=1), nll, tokens


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example pairwise preference losses, with the formulas of TRL's ``DPOTrainer.dpo_loss``.

    With the log-ratio difference ``h = (pi_c - pi_r) - (ref_c - ref_r)`` (``pi``/``ref``: policy and
    reference log-probabilities of the chosen ``c`` and rejected ``r`` responses), ``s`` the logistic
    sigmoid and ``e = label_smoothing``:

    - ``sigmoid``: DPO (Rafailov et al. 2023, eq. 7), ``-log s(beta h)``; with ``e > 0`` conservative
      DPO (cDPO, Mitchell 2023): ``-(1 - e) log s(beta h) - e log s(-beta h)``.
    - ``ipo``: IPO (Azar et al. 2023, eq. 17, ``tau = beta``): ``(h - 1 / (2 beta))^2``. TRL feeds IPO
      length-averaged log-probabilities (``logps / counts`` from :func:`sequence_logps`); pass those.
    - ``hinge``: SLiC-style hinge (Zhao et al. 2023): ``relu(1 - beta h)``.
    - ``robust``: robust DPO (Chowdhury et al. 2024, unbiased under label-flip rate ``e``):
      ``(-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2 e)``; equal to DPO at ``e = 0``.

    Implicit rewards (detached, for logging): ``chosen = beta (pi_c - ref_c)``,
    ``rejected = beta (pi_r - ref_r)``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(batch,)`` policy log-probabilities.
        reference_chosen_logps, reference_rejected_logps: ``(batch,)`` reference log-probabilities.
        beta: strength of the implicit KL regularisation (``> 0``).
        loss_type: one of :data:`LOSS_TYPES`.
        label_smoothing: ``e`` in ``[0, 0.5)``; only ``sigmoid`` and ``robust`` use it.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(batch,)``; reduce ``losses`` yourself.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in _SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect with loss_type {loss_type!r}; "
            f"it applies to {' and '.join(_SMOOTHED_LOSS_TYPES)} only (set it to 0)"
        )
    shape = policy_chosen_logps.shape
    others = (policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if any(t.shape != shape for t in others):
        shapes = [tuple(t.shape) for t in (policy_chosen_logps, *others)]
        raise ValueError(f"the four log-probability tensors must have the same shape, got {shapes}")

    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios  # h
    eps = label_smoothing
    if loss_type in _SMOOTHED_LOSS_TYPES:
        log_p_chosen = F.logsigmoid(beta * logits)  # log s(beta h)
        log_p_rejected = F.logsigmoid(-beta * logits)  # log s(-beta h)
        if loss_type == "sigmoid":
            losses = -(1 - eps) * log_p_chosen - eps * log_p_rejected
        else:  # robust
            losses = (-(1 - eps) * log_p_chosen + eps * log_p_rejected) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(chosen_logps: Tensor, chosen_counts: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of the chosen responses, from :func:`sequence_logps` output.

    ``-sum_b chosen_logps[b] / sum_b chosen_counts[b]``: the same token-level mean as :func:`sft_loss`
    on the chosen sequences (``0`` when there is no token). ``chosen_logps`` must be the summed
    log-probabilities, not length-averaged ones.
    """
    if chosen_logps.shape != chosen_counts.shape:
        raise ValueError(
            f"chosen_logps {tuple(chosen_logps.shape)} and chosen_counts {tuple(chosen_counts.shape)} differ"
        )
    return -chosen_logps.sum() / chosen_counts.sum().clamp(min=1)


def dpo_with_sft(
    preference_losses: Tensor,
    chosen_logps: Tensor,
    chosen_counts: Tensor,
    sft_weight: float = 0.0,
) -> Tensor:
    """Batch preference loss plus a weighted SFT term on the chosen response (RPO-style).

    ``loss = mean(preference_losses) + sft_weight * chosen_nll(chosen_logps, chosen_counts)``, where
    ``preference_losses`` is the first output of :func:`preference_loss` and ``chosen_logps`` /
    ``chosen_counts`` are the policy's summed log-probabilities and token counts of the chosen responses
    from :func:`sequence_logps`. With ``sft_weight = 0`` this is just the mean preference loss.
    """
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    loss = preference_losses.mean()
    if sft_weight == 0:
        return loss
    return loss + sft_weight * chosen_nll(chosen_logps, chosen_counts)
