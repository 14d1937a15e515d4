"""Unit tests of the alignment losses against hand-computed values and naive loops (no model)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses import (
    LOSS_TYPES,
    chosen_nll,
    dpo_with_sft,
    pair_logps,
    preference_loss,
    sequence_logps,
    sft_loss,
)


def log_sigmoid(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


def log_softmax_at(row: list[float], index: int) -> float:
    return row[index] - math.log(sum(math.exp(v) for v in row))


def naive_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Token-by-token reference in plain Python floats."""
    sums, counts = [], []
    for b in range(labels.shape[0]):
        total, n = 0.0, 0
        for t in range(labels.shape[1] - 1):
            label = int(labels[b, t + 1])
            if label == ignore_index:
                continue
            total += log_softmax_at(logits[b, t].tolist(), label)
            n += 1
        sums.append(total)
        counts.append(n)
    return sums, counts


def random_batch(seed: int = 0, batch: int = 3, seq_len: int = 9, vocab: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq_len, vocab, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (batch, seq_len), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, :2] = -100
    labels[1, -2:] = -100  # right padding
    labels[2, ::2] = -100  # scattered mask
    return logits, labels


# ---------------------------------------------------------------- sequence_logps


def test_sequence_logps_hand_computed():
    logits = torch.tensor(
        [[[50.0, -50.0, 9.0], [0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [-30.0, 40.0, 7.0]]], dtype=torch.float64
    )
    labels = torch.tensor([[1, -100, 2, 0]])  # labels[:, 0] is never scored (causal shift)
    logps, counts = sequence_logps(logits, labels)
    expected = (2.0 - math.log(1 + math.e + math.e**2)) + math.log(1 / 3)
    assert logps.tolist() == pytest.approx([expected], abs=1e-12)
    assert counts.tolist() == [2]
    assert counts.dtype == torch.int64


def test_sequence_logps_matches_naive_loop():
    logits, labels = random_batch()
    logps, counts = sequence_logps(logits, labels)
    ref_sums, ref_counts = naive_sequence_logps(logits, labels)
    assert logps.dtype == torch.float64
    assert logps.tolist() == pytest.approx(ref_sums, abs=1e-10)
    assert counts.tolist() == ref_counts


def test_sequence_logps_custom_ignore_index():
    logits, labels = random_batch(seed=1)
    relabelled = labels.masked_fill(labels == -100, -1)
    a, ca = sequence_logps(logits, labels)
    b, cb = sequence_logps(logits, relabelled, ignore_index=-1)
    torch.testing.assert_close(a, b)
    assert ca.tolist() == cb.tolist()


def test_masked_tokens_contribute_nothing():
    logits, labels = random_batch(seed=2)
    logps, counts = sequence_logps(logits, labels)
    assert counts.tolist() == (labels[:, 1:] != -100).sum(-1).tolist()
    # Overwrite the logits that predict masked labels, and the last position (predicts nothing).
    predicts_masked = torch.cat([labels[:, 1:] == -100, torch.ones(labels.shape[0], 1, dtype=torch.bool)], 1)
    changed = logits.clone()
    changed[predicts_masked] = torch.randn_like(changed[predicts_masked]) * 100
    logps2, counts2 = sequence_logps(changed, labels)
    torch.testing.assert_close(logps, logps2)
    assert counts.tolist() == counts2.tolist()


def test_fully_masked_sequence_is_zero():
    logits, labels = random_batch(seed=3)
    labels[1] = -100
    logps, counts = sequence_logps(logits, labels)
    assert logps[1].item() == 0.0
    assert counts[1].item() == 0
    ref_sums, _ = naive_sequence_logps(logits, labels)
    assert logps.tolist() == pytest.approx(ref_sums, abs=1e-10)


def test_sequence_logps_gradient_only_at_scored_positions():
    logits, labels = random_batch(seed=4)
    logits.requires_grad_(True)
    logps, _ = sequence_logps(logits, labels)
    logps.sum().backward()
    scored = torch.cat([labels[:, 1:] != -100, torch.zeros(labels.shape[0], 1, dtype=torch.bool)], 1)
    assert torch.all(logits.grad[~scored] == 0)
    # d/dz log_softmax(z)[y] = onehot(y) - softmax(z): each scored row's gradient sums to zero, nonzero.
    assert torch.all(logits.grad[scored].abs().sum(-1) > 0)
    row_sums = logits.grad[scored].sum(-1)
    torch.testing.assert_close(row_sums, torch.zeros_like(row_sums))


def test_sequence_logps_half_precision_upcasts():
    logits, labels = random_batch(seed=5)
    logps_bf16, counts = sequence_logps(logits.to(torch.bfloat16), labels)
    assert logps_bf16.dtype == torch.float32
    ref, _ = sequence_logps(logits.to(torch.bfloat16).double(), labels)
    torch.testing.assert_close(logps_bf16.double(), ref, atol=1e-4, rtol=1e-5)


def test_sequence_logps_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels shape"):
        sequence_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- sft_loss


def test_sft_loss_hand_computed_token_mean():
    # Sequence 0 scores one token, sequence 1 scores two: the token mean is (a + b + c) / 3,
    # not the mean of per-sequence means ((a) + (b + c) / 2) / 2.
    logits = torch.tensor(
        [
            [[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]],
            [[1.0, 0.0], [0.0, 3.0], [5.0, 5.0]],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([[-100, -100, 1], [-100, 0, 1]])
    a = -log_softmax_at([2.0, 0.0], 1)
    b = -log_softmax_at([1.0, 0.0], 0)
    c = -log_softmax_at([0.0, 3.0], 1)
    loss, nll, tokens = sft_loss(logits, labels)
    assert loss.item() == pytest.approx((a + b + c) / 3, abs=1e-12)
    assert loss.item() != pytest.approx((a + (b + c) / 2) / 2, abs=1e-3)
    assert nll.item() == pytest.approx(a + b + c, abs=1e-12) and tokens.item() == 3


def test_sft_loss_matches_hf_causal_lm_loss():
    logits, labels = random_batch(seed=6)
    vocab = logits.shape[-1]
    hf = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_loss(logits, labels)[0], hf)


def test_sft_loss_all_masked_is_zero_and_differentiable():
    logits, labels = random_batch(seed=7)
    logits.requires_grad_(True)
    loss, nll, tokens = sft_loss(logits, torch.full_like(labels, -100))
    assert loss.item() == 0.0 and nll.item() == 0.0 and tokens.item() == 0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_sft_loss_of_an_accumulation_window_is_its_summed_nll_over_its_tokens():
    """What training does over micro-batches (and ranks): backpropagate each one's `nll` and divide the
    gradients by the window's tokens. That is the loss of the whole window as one batch, in value and in
    gradient, not the mean of the micro-batches' losses (their token counts differ)."""
    logits, labels = random_batch(seed=9, batch=4)
    logits.requires_grad_(True)
    whole, _, _ = sft_loss(logits, labels)
    expected = torch.autograd.grad(whole, logits)[0]
    parts = [sft_loss(logits[rows], labels[rows]) for rows in (slice(0, 1), slice(1, 4))]
    assert parts[0][2] != parts[1][2], "micro-batches of different token counts"
    tokens = sum(part[2] for part in parts)
    window = sum(part[1] for part in parts) / tokens
    torch.testing.assert_close(window, whole)
    torch.testing.assert_close(torch.autograd.grad(window, logits)[0], expected)
    mean_of_losses = sum(part[0] for part in parts) / 2
    assert not torch.isclose(mean_of_losses, whole)


# ---------------------------------------------------------------- preference_loss

PC, PR, RC, RR = [-4.0, -10.0, -3.0], [-6.0, -8.0, -3.5], [-5.0, -9.0, -2.0], [-5.5, -9.5, -4.0]


def logps(*values: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64) for v in values]


def margins() -> list[float]:
    return [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)]


def test_margins_cover_both_signs():
    assert margins() == pytest.approx([1.5, -2.5, -1.5])


def test_dpo_sigmoid_hand_computed():
    beta = 0.5
    losses, chosen, rejected = preference_loss(*logps(PC, PR, RC, RR), beta=beta)
    expected = [-log_sigmoid(beta * h) for h in margins()]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert chosen.tolist() == pytest.approx([beta * (pc - rc) for pc, rc in zip(PC, RC, strict=True)])
    assert rejected.tolist() == pytest.approx([beta * (pr - rr) for pr, rr in zip(PR, RR, strict=True)])


def test_cdpo_label_smoothing_hand_computed():
    beta, eps = 0.1, 0.2
    losses, _, _ = preference_loss(*logps(PC, PR, RC, RR), beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in margins()]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_ipo_hand_computed():
    beta = 0.25
    losses, _, _ = preference_loss(*logps(PC, PR, RC, RR), beta=beta, loss_type="ipo")
    expected = [(h - 1 / (2 * beta)) ** 2 for h in margins()]  # 1 / (2 beta) = 2
    assert losses.tolist() == pytest.approx([0.25, 20.25, 12.25], abs=1e-12)
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_hinge_hand_computed():
    beta = 1.0
    losses, _, _ = preference_loss(*logps(PC, PR, RC, RR), beta=beta, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.0, 3.5, 2.5], abs=1e-12)  # relu(1 - beta h)
    losses, _, _ = preference_loss(*logps(PC, PR, RC, RR), beta=0.5, loss_type="hinge")
    assert losses.tolist() == pytest.approx([max(0.0, 1 - 0.5 * h) for h in margins()], abs=1e-12)


def test_robust_hand_computed():
    beta, eps = 0.3, 0.1
    losses, _, _ = preference_loss(*logps(PC, PR, RC, RR), beta=beta, loss_type="robust", label_smoothing=eps)
    expected = [
        (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in margins()
    ]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_robust_without_smoothing_equals_sigmoid():
    inputs = logps(PC, PR, RC, RR)
    robust, rc, rr = preference_loss(*inputs, beta=0.2, loss_type="robust", label_smoothing=0.0)
    sigmoid, sc, sr = preference_loss(*inputs, beta=0.2, loss_type="sigmoid")
    torch.testing.assert_close(robust, sigmoid)
    torch.testing.assert_close(rc, sc)
    torch.testing.assert_close(rr, sr)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_reach_policy_not_rewards(loss_type):
    pc, pr, rc, rr = logps(PC, PR, RC, RR)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, chosen, rejected = preference_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type)
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # Example 1 (h = -2.5) prefers the rejected response: every loss pushes chosen up and rejected down.
    assert pc.grad[1].item() < 0 and pr.grad[1].item() > 0
    torch.testing.assert_close(pc.grad, -pr.grad)


def test_dpo_gradient_hand_computed():
    # d/d pi_c of -log s(beta h) = -beta * s(-beta h)
    beta = 0.5
    pc, pr, rc, rr = logps(PC, PR, RC, RR)
    pc.requires_grad_(True)
    preference_loss(pc, pr, rc, rr, beta=beta)[0].sum().backward()
    expected = [-beta / (1 + math.exp(beta * h)) for h in margins()]
    assert pc.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_invalid_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        preference_loss(*logps(PC, PR, RC, RR), loss_type="kto")


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7])
def test_invalid_label_smoothing(eps):
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        preference_loss(*logps(PC, PR, RC, RR), loss_type="robust", label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_rejected_where_unused(loss_type):
    with pytest.raises(ValueError, match="no effect"):
        preference_loss(*logps(PC, PR, RC, RR), loss_type=loss_type, label_smoothing=0.1)


def test_invalid_beta_and_shapes():
    with pytest.raises(ValueError, match="beta"):
        preference_loss(*logps(PC, PR, RC, RR), beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(*logps(PC, PR, RC, RR[:2]))


# ---------------------------------------------------------------- SFT term on the chosen response


def test_chosen_nll_and_dpo_with_sft_hand_computed():
    losses = torch.tensor([0.5, 1.5], dtype=torch.float64)
    chosen_logps = torch.tensor([-3.0, -9.0], dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 4])
    assert chosen_nll(chosen_logps, counts).item() == pytest.approx(12.0 / 6.0)
    total = dpo_with_sft(losses, chosen_logps, counts, sft_weight=0.5)
    assert total.item() == pytest.approx(1.0 + 0.5 * 2.0)
    total.backward()
    assert chosen_logps.grad.tolist() == pytest.approx([-0.5 / 6, -0.5 / 6])


def test_dpo_with_sft_zero_weight_is_mean():
    losses = torch.tensor([0.5, 1.5, 4.0])
    chosen = torch.tensor([-1.0, -2.0, -3.0])
    assert dpo_with_sft(losses, chosen, torch.tensor([1, 1, 1])).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="sft_weight"):
        dpo_with_sft(losses, chosen, torch.tensor([1, 1, 1]), sft_weight=-1.0)


def test_chosen_nll_equals_sft_loss_on_chosen_sequences():
    logits, labels = random_batch(seed=8)
    chosen_logps, counts = sequence_logps(logits, labels)
    torch.testing.assert_close(chosen_nll(chosen_logps, counts), sft_loss(logits, labels)[0])


def test_pair_logps_scores_each_response_from_its_own_context():
    """A pair row [pad][prompt x2][chosen x2][rejected x2]: chosen tokens are scored by the logits before
    them, the first rejected token by the last prompt token's (not the last chosen token's), the second
    rejected token by the first rejected token's; chosen first, then rejected, as sequence_logps of the
    rows [prompt][chosen] and [prompt][rejected]."""
    from datamodules.batch_format import Segment

    P0, P, C, R = Segment.PAD, Segment.PROMPT, Segment.CHOSEN, Segment.REJECTED

    torch.manual_seed(0)
    logits = torch.randn(1, 7, 5, dtype=torch.float64, requires_grad=True)
    segments = torch.tensor([[P0, P, P, C, C, R, R]])
    labels = torch.tensor([[-100, -100, -100, 1, 2, 3, 4]])
    logps, counts = pair_logps(logits, labels, segments)
    log_probs = torch.log_softmax(logits[0], dim=-1)
    chosen = log_probs[2, 1] + log_probs[3, 2]
    rejected = log_probs[2, 3] + log_probs[5, 4]
    torch.testing.assert_close(logps, torch.stack([chosen, rejected]))
    assert counts.tolist() == [2, 2]
    logps[1].backward()
    scored = logits.grad[0].abs().sum(dim=-1) > 0
    assert scored.tolist() == [False, False, True, False, False, True, False], "no chosen logits in rejected"

    # the same numbers as sequence_logps on the two rows, with the logits each row would have
    chosen_row = logits[:, [0, 1, 2, 3, 4]].detach()
    rejected_row = logits[:, [0, 1, 2, 5, 6]].detach()
    rows, row_counts = sequence_logps(torch.cat([chosen_row, rejected_row]),
                                      torch.tensor([[-100, -100, -100, 1, 2], [-100, -100, -100, 3, 4]]))
    torch.testing.assert_close(logps.detach(), rows)
    assert row_counts.tolist() == counts.tolist()


def test_pair_logps_batches_rows_and_checks_shapes():
    from datamodules.batch_format import Segment

    P, C, R = Segment.PROMPT, Segment.CHOSEN, Segment.REJECTED

    logits = torch.randn(2, 4, 3)
    segments = torch.tensor([[P, C, R, R], [P, P, C, R]])
    labels = torch.tensor([[-100, 0, 1, 2], [-100, -100, 1, 0]])
    logps, counts = pair_logps(logits, labels, segments)
    assert logps.shape == (4,) and counts.tolist() == [1, 1, 2, 1]
    with pytest.raises(ValueError, match="segments"):
        pair_logps(logits, labels, segments[:, :3])
