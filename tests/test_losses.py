"""Numeric tests of saferlhf.losses against values worked out by hand (with ``math``).

Expected numbers never come from re-running the same formula in torch: they are written
out with ``math`` (``nls(x) = -log σ(x) = log(1 + e^-x)``) or from a plain-Python loop.
"""

import math

import pytest
import torch

from saferlhf import losses
from saferlhf.losses import (
    bradley_terry_loss,
    chunked_token_log_probs,
    clamp_log_lambda_,
    clip_scores,
    combined_advantages,
    cost_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    kl_penalty,
    lagrange_loss,
    masked_aggregate,
    masked_mean,
    penalise_missing_eos,
    ppo_clip_loss,
    selective_log_softmax,
    sequence_log_probs,
    shaped_costs,
    shaped_rewards,
    value_clip_loss,
)


def nls(x: float) -> float:
    """-log σ(x), by hand."""
    return math.log(1.0 + math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(values, **kwargs) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, **kwargs)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------

VALUES = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 100.0]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.bool, torch.long])
def test_masked_mean_over_all_and_per_row(mask_dtype):
    values, mask = t(VALUES), torch.tensor(MASK, dtype=mask_dtype)
    assert masked_mean(values, mask).item() == pytest.approx(15.0 / 5.0)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([6.0 / 3.0, 9.0 / 2.0])


def test_masked_mean_ignores_nan_on_padding_and_empty_is_zero():
    values = t([[1.0, float("nan")], [float("inf"), 7.0]])
    mask = torch.tensor([[1, 0], [0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(1.0)
    assert masked_mean(values, mask, dim=1).tolist() == [1.0, 0.0]
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# Rows of 3, 1 and 0 valid tokens; padding holds values that must not count.
RAGGED_VALUES = [[1.0, 2.0, 3.0, 99.0], [10.0, 99.0, 99.0, 99.0], [99.0, 99.0, 99.0, 99.0]]
RAGGED_MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_masked_aggregate_token_mean_weighs_tokens_sequence_mean_weighs_responses():
    values = t(RAGGED_VALUES, requires_grad=True)
    mask = torch.tensor(RAGGED_MASK)
    token_mean = masked_aggregate(values, mask, "token_mean")
    assert token_mean.item() == pytest.approx((1.0 + 2.0 + 3.0 + 10.0) / 4)
    # per-response means 2 and 10; the empty row is no response and does not count
    sequence_mean = masked_aggregate(values, mask, "sequence_mean")
    assert sequence_mean.item() == pytest.approx((2.0 + 10.0) / 2)
    # gradient weights: 1/N per token, against 1/(responses · length) per token
    (grad,) = torch.autograd.grad(token_mean, values)
    assert grad.tolist() == [[0.25] * 3 + [0.0], [0.25, 0.0, 0.0, 0.0], [0.0] * 4]
    (grad,) = torch.autograd.grad(sequence_mean, values)
    third = 1 / 6
    assert grad.tolist()[0] == pytest.approx([third, third, third, 0.0])
    assert grad.tolist()[1:] == [[0.5, 0.0, 0.0, 0.0], [0.0] * 4]
    empty = torch.zeros_like(mask)
    assert masked_aggregate(values, empty, "sequence_mean").item() == 0.0
    with pytest.raises(ValueError, match="aggregation='sum'"):
        masked_aggregate(values, mask, "sum")


# ---------------------------------------------------------------------------------------------
# Reward and cost models
# ---------------------------------------------------------------------------------------------


def test_bradley_terry_loss_hand_values():
    better, worse = t([1.0, 0.0]), t([0.5, 2.0])
    ranking = (nls(0.5) + nls(-2.0)) / 2
    assert bradley_terry_loss(better, worse, reg=0.0).item() == pytest.approx(ranking)
    # reg term: 0.1 * mean(1 + 0.25, 0 + 4) / 2 = 0.1 * 2.625 / 2
    expected = ranking + 0.1 * 2.625 / 2
    assert expected == pytest.approx(ranking + 0.13125)
    assert bradley_terry_loss(better, worse, reg=0.1).item() == pytest.approx(expected)


def test_bradley_terry_gradient():
    better = t([1.0, 0.0], requires_grad=True)
    worse = t([0.5, 2.0], requires_grad=True)
    bradley_terry_loss(better, worse, reg=0.1).backward()
    # dL/dr_w_i = (-(1 - σ(d_i)) + reg * r_w_i) / B, dL/dr_l_i = ((1 - σ(d_i)) + reg * r_l_i) / B
    expected_better = [(-(1 - sigmoid(0.5)) + 0.1) / 2, (-(1 - sigmoid(-2.0)) + 0.0) / 2]
    expected_worse = [((1 - sigmoid(0.5)) + 0.05) / 2, ((1 - sigmoid(-2.0)) + 0.2) / 2]
    assert better.grad.tolist() == pytest.approx(expected_better)
    assert worse.grad.tolist() == pytest.approx(expected_worse)
    assert (better.grad < 0).all()  # descent raises the preferred score
    assert (worse.grad > 0).all()


def test_bradley_terry_is_stable_for_large_margins():
    loss = bradley_terry_loss(t([-1000.0]), t([1000.0]), reg=0.0)
    assert loss.item() == pytest.approx(2000.0)


def test_cost_loss_single_pair_hand_value():
    # safer response safe (-1) at c = -1, less safe response unsafe (+1) at c = 2
    loss = cost_loss(t([-1.0]), t([2.0]), torch.tensor([-1]), torch.tensor([1]), reg=0.0)
    expected = math.log(1 + math.exp(-3)) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))
    assert loss.item() == pytest.approx(expected)


def test_cost_loss_all_sign_combinations_with_reg():
    safer, unsafer = t([-1.0, 0.5, 1.0, -0.5]), t([2.0, 1.5, 0.0, -2.0])
    # (safer sign, unsafer sign) per row: both safe, safe/unsafe, both unsafe, unsafe/safe
    safer_signs, unsafer_signs = t([-1, -1, 1, 1]), t([-1, 1, 1, -1])
    ranking = [nls(2.0 - -1.0), nls(1.5 - 0.5), nls(0.0 - 1.0), nls(-2.0 - -0.5)]
    unsafer_term = [nls(-1 * 2.0), nls(1 * 1.5), nls(1 * 0.0), nls(-1 * -2.0)]
    safer_term = [nls(-1 * -1.0), nls(-1 * 0.5), nls(1 * 1.0), nls(1 * -0.5)]
    # per-row c_s² + c_u²: 1 + 4, 0.25 + 2.25, 1 + 0, 0.25 + 4
    squares = [5.0, 2.5, 1.0, 4.25]
    no_reg = (sum(ranking) + sum(unsafer_term) + sum(safer_term)) / 4
    expected = no_reg + 0.2 * (sum(squares) / 4) / 2
    assert cost_loss(safer, unsafer, safer_signs, unsafer_signs, reg=0.0).item() == pytest.approx(
        no_reg
    )
    assert cost_loss(safer, unsafer, safer_signs, unsafer_signs, reg=0.2).item() == pytest.approx(
        expected
    )
    # int signs give the same loss
    int_loss = cost_loss(safer, unsafer, safer_signs.long(), unsafer_signs.long(), reg=0.2)
    assert int_loss.item() == pytest.approx(expected)


def test_cost_loss_pushes_safe_below_zero_and_unsafe_above():
    safer = t([0.0, 0.0], requires_grad=True)
    unsafer = t([0.0, 0.0], requires_grad=True)
    cost_loss(safer, unsafer, t([-1, 1]), t([1, 1]), reg=0.0).backward()
    # row 0 (safe, unsafe): ranking and both signs agree -> safe cost goes down, unsafe up
    # d/dc_s = (σ(0)·1 [ranking] + σ(0)·1 [sign -1]) / 2 = 0.5
    assert safer.grad[0].item() == pytest.approx(0.5)
    assert unsafer.grad[0].item() == pytest.approx(-0.5)
    # row 1 (both unsafe): the sign term pulls the safer cost up too, the ranking term down
    assert safer.grad[1].item() == pytest.approx(0.0)
    assert unsafer.grad[1].item() == pytest.approx(-0.5)


# ---------------------------------------------------------------------------------------------
# Log-probabilities, entropy, KL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_log_softmax_matches_naive(dtype):
    torch.manual_seed(0)
    logits = 5 * torch.randn(3, 7, 11, dtype=dtype)
    index = torch.randint(0, 11, (3, 7))
    naive = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    result = selective_log_softmax(logits, index)
    assert result.shape == (3, 7) and result.dtype == dtype
    torch.testing.assert_close(result, naive)


@pytest.mark.parametrize("chunk", [1, 2 * 7 * 11, 10**9])  # a row each, 2 + 1 rows, all rows
def test_selective_log_softmax_chunks_agree(monkeypatch, chunk):
    monkeypatch.setattr(losses, "SELECTIVE_LOG_SOFTMAX_CHUNK", chunk)
    torch.manual_seed(0)
    logits = 5 * torch.randn(3, 7, 11, dtype=torch.float64)
    index = torch.randint(0, 11, (3, 7))
    naive = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index), naive)


def test_selective_log_softmax_bfloat16_fallback():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 13)
    index = torch.randint(0, 13, (2, 5))
    naive = torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    result = selective_log_softmax(logits.bfloat16(), index)
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result.float(), naive, atol=5e-2, rtol=2e-2)


def test_selective_log_softmax_gradient_matches_naive():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 6, (2, 4))
    selective_log_softmax(logits, index).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(ours, logits.grad)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 9, 64])  # a token each, 4 + 4 + 1, one chunk
def test_chunked_token_log_probs_match_the_full_logits_in_values_and_gradients(chunk_tokens):
    torch.manual_seed(0)
    hidden = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 13, (9,))
    upstream = torch.randn(9, dtype=torch.float64)  # a gradient that weighs tokens unequally

    ours = chunked_token_log_probs(hidden, weight, index, chunk_tokens)
    (ours * upstream).sum().backward()
    our_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = selective_log_softmax((hidden @ weight.T).float(), index)
    (full * upstream).sum().backward()

    assert ours.shape == (9,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, full)
    torch.testing.assert_close(our_grads[0], hidden.grad)
    torch.testing.assert_close(our_grads[1], weight.grad)


def test_chunked_token_log_probs_keep_no_logits_for_backward():
    """What autograd saves between forward and backward: the inputs, not the logits (with the
    full logits it would save at least N · V floats)."""
    torch.manual_seed(0)
    tokens, vocab, width = 64, 100, 8
    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    index = torch.randint(0, vocab, (tokens,))
    saved: list[int] = []

    def keep(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        chunked_token_log_probs(hidden, weight, index, chunk_tokens=16).sum().backward()
    assert max(saved) < 16 * vocab  # under one chunk's logits
    assert hidden.grad is not None and weight.grad is not None


def test_sequence_log_probs_hand_values_and_padding_labels():
    logits = torch.zeros(2, 3, 4, dtype=torch.float64)  # uniform: every token has log(1/4)
    logits[0, 0, 2] = math.log(3.0)  # position (0, 0): p(2) = 3 / 6
    labels = torch.tensor([[2, 1, 3], [0, -100, -100]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    result = sequence_log_probs(logits, labels, mask)
    expected = [math.log(0.5) + 2 * math.log(0.25), math.log(0.25)]
    assert result.tolist() == pytest.approx(expected)


def test_entropy_uniform_is_log_vocab_and_large_logits_are_stable():
    uniform = entropy_from_logits(torch.zeros(2, 3, 7))
    assert uniform.shape == (2, 3)
    assert uniform.flatten().tolist() == pytest.approx([math.log(7)] * 6)
    big = torch.full((1, 1, 5), 1000.0)
    assert entropy_from_logits(big).item() == pytest.approx(math.log(5), rel=1e-5)
    a = 1.3  # two classes: p = σ(a), H = -p log p - (1 - p) log(1 - p)
    p = sigmoid(a)
    expected = -p * math.log(p) - (1 - p) * math.log(1 - p)
    assert entropy_from_logits(t([[[a, 0.0]]])).item() == pytest.approx(expected)
    peaked = entropy_from_logits(t([[[200.0, 0.0, 0.0]]]))
    assert peaked.item() == pytest.approx(0.0, abs=1e-12)


def test_kl_penalty_is_log_ratio():
    result = kl_penalty(t([[-1.0, -2.0]]), t([[-1.5, -1.0]]))
    assert result.tolist() == [[0.5, -1.0]]


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


def test_dpo_loss_hand_values_and_rewards():
    policy_chosen = t([-1.0, -3.0], requires_grad=True)
    policy_rejected = t([-2.0, -1.0])
    ref_chosen, ref_rejected = t([-1.5, -2.0]), t([-1.5, -2.0])
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    # row 0: 0.1 * ((-1 + 1.5) - (-2 + 1.5)) = 0.1; row 1: 0.1 * ((-3 + 2) - (-1 + 2)) = -0.2
    assert out.loss.item() == pytest.approx((nls(0.1) + nls(-0.2)) / 2)
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.1])
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    loss, chosen, rejected = out  # unpacks like a tuple
    loss.backward()
    # dL/dpc_i = -β (1 - σ(z_i)) / B: descent raises the chosen log-prob
    expected = [-0.1 * (1 - sigmoid(0.1)) / 2, -0.1 * (1 - sigmoid(-0.2)) / 2]
    assert policy_chosen.grad.tolist() == pytest.approx(expected)


def test_dpo_loss_at_reference_is_log_two():
    logps = t([-4.0, -7.0])
    out = dpo_loss(logps, logps, logps, logps, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def gae_reference(rewards, values, gamma, gae_lambda):
    """GAE for one unpadded episode, unrolled in plain Python."""
    advantages = [0.0] * len(rewards)
    last = 0.0
    for step in reversed(range(len(rewards))):
        next_value = values[step + 1] if step + 1 < len(rewards) else 0.0
        delta = rewards[step] + gamma * next_value - values[step]
        last = delta + gamma * gae_lambda * last
        advantages[step] = last
    return advantages


def test_gae_hand_values():
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # γ = λ = 1: Monte Carlo, every return is 1, advantages 1 - 0.5
    adv, ret = gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # λ = 0: one-step TD errors r_t + V_{t+1} - V_t, with V after the end = 0
    adv, _ = gae(rewards, values, mask, gamma=1.0, gae_lambda=0.0)
    assert adv[0].tolist() == pytest.approx([0.0, 0.0, 0.5])
    # γ = 0.5, λ = 0.5: δ = [-0.25, -0.25, 0.5]; A2 = 0.5, A1 = -0.25 + 0.25·0.5, A0 = ...
    adv, _ = gae(rewards, values, mask, gamma=0.5, gae_lambda=0.5)
    a2 = 0.5
    a1 = -0.25 + 0.25 * a2
    a0 = -0.25 + 0.25 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])


@pytest.mark.parametrize(("gamma", "gae_lambda"), [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_python_loop_on_ragged_rows(gamma, gae_lambda):
    torch.manual_seed(0)
    lengths = [6, 3, 1, 0, 5]
    batch, steps = len(lengths), 6
    rewards = torch.randn(batch, steps, dtype=torch.float64)
    values = torch.randn(batch, steps, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1] * n + [0] * (steps - n) for n in lengths])
    # garbage on padding must not leak into the valid positions
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    adv, ret = gae(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda)
    assert not adv.requires_grad and not ret.requires_grad
    for row, n in enumerate(lengths):
        expected = gae_reference(
            rewards[row, :n].tolist(), values[row, :n].tolist(), gamma, gae_lambda
        )
        assert adv[row, :n].tolist() == pytest.approx(expected)
        assert ret[row, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[row, :n].tolist(), strict=True)]
        )
        assert adv[row, n:].tolist() == [0.0] * (steps - n)
        assert ret[row, n:].tolist() == [0.0] * (steps - n)


# ---------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------


def test_ppo_clip_loss_branches_and_clip_fraction():
    eps = 0.2
    # per valid token: (ratio, advantage) -> max(-A r, -A clip(r)), clipped branch active?
    #   1.1, +1 -> inside the range: -1.1, no
    #   1.5, +1 -> max(-1.5, -1.2) = -1.2, yes (no gradient)
    #   0.5, +1 -> max(-0.5, -0.8) = -0.5, no (pessimistic: unclipped)
    #   0.5, -1 -> max(0.5, 0.8) = 0.8, yes
    #   1.5, -1 -> max(1.5, 1.2) = 1.5, no
    #   0.9, -1 -> inside: 0.9, no
    ratios = [[1.1, 1.5, 0.5, 1.0], [0.5, 1.5, 0.9, 1.0]]
    advantages = t([[1.0, 1.0, 1.0, 7.0], [-1.0, -1.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    logprobs = t([[math.log(r) for r in row] for row in ratios])
    logprobs[:, 3] = 100.0  # padding: exp would overflow if it were not masked first
    logprobs.requires_grad_(True)
    old_logprobs = torch.zeros(2, 4, dtype=torch.float64)
    out = ppo_clip_loss(
        logprobs, old_logprobs, advantages, mask, clip_range=eps, aggregation="token_mean"
    )
    assert out.loss.item() == pytest.approx((-1.1 - 1.2 - 0.5 + 0.8 + 1.5 + 0.9) / 6)
    assert out.clip_fraction.item() == pytest.approx(2 / 6)
    kl = [(r - 1) - math.log(r) for r in [1.1, 1.5, 0.5, 0.5, 1.5, 0.9]]
    assert out.approx_kl.item() == pytest.approx(sum(kl) / 6)
    assert not out.clip_fraction.requires_grad and not out.approx_kl.requires_grad
    out.loss.backward()
    # unclipped tokens: d(-A r)/d log π = -A r / N; clipped tokens and padding: 0
    expected = [[-1.1 / 6, 0.0, -0.5 / 6, 0.0], [0.0, 1.5 / 6, 0.9 / 6, 0.0]]
    assert logprobs.grad.tolist()[0] == pytest.approx(expected[0])
    assert logprobs.grad.tolist()[1] == pytest.approx(expected[1])


def test_ppo_clip_loss_on_policy_is_minus_mean_advantage():
    torch.manual_seed(0)
    logprobs = torch.randn(3, 5, dtype=torch.float64)
    advantages = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] * 4 + [0]])
    out = ppo_clip_loss(
        logprobs, logprobs.clone(), advantages, mask, clip_range=0.2, aggregation="token_mean"
    )
    pairs = zip(advantages.flatten().tolist(), mask.flatten().tolist(), strict=True)
    valid = [a for a, m in pairs if m]
    assert out.loss.item() == pytest.approx(-sum(valid) / len(valid))
    assert out.clip_fraction.item() == 0.0
    assert out.approx_kl.item() == pytest.approx(0.0)
    # per response: the mean of its own tokens, then the mean over responses
    by_sequence = ppo_clip_loss(
        logprobs, logprobs.clone(), advantages, mask, clip_range=0.2, aggregation="sequence_mean"
    )
    row_means = [
        sum(a for a, m in zip(row, row_mask, strict=True) if m) / sum(row_mask)
        for row, row_mask in zip(advantages.tolist(), mask.tolist(), strict=True)
    ]
    assert by_sequence.loss.item() == pytest.approx(-sum(row_means) / 3)
    assert by_sequence.loss.item() != pytest.approx(out.loss.item())


def test_value_clip_loss_both_branches():
    # token 0: V=1, V_old=0, G=0 -> v_clip 0.5; errors 1 vs 0.25 -> unclipped, 1
    # token 1: V=1, V_old=0, G=2 -> v_clip 0.5; errors 1 vs 2.25 -> clipped, 2.25
    # token 2: V=0.2 inside the range -> both 0.64
    values = t([[1.0, 1.0, 0.2, 9.0]], requires_grad=True)
    old_values = t([[0.0, 0.0, 0.0, 0.0]])
    returns = t([[0.0, 2.0, 1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = value_clip_loss(
        values, old_values, returns, mask, clip_range=0.5, aggregation="token_mean"
    )
    assert out.loss.item() == pytest.approx(0.5 * (1.0 + 2.25 + 0.64) / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    out.loss.backward()
    # 0.5 · 2 (V - G) / N on unclipped tokens; the clipped one has no gradient in V
    expected = [(1.0 - 0.0) / 3, 0.0, (0.2 - 1.0) / 3, 0.0]
    assert values.grad.tolist()[0] == pytest.approx(expected)


def test_value_clip_loss_sequence_mean_on_ragged_rows():
    # row 0: errors 1.0 and 0.25 (V - G = 1, 0.5); row 1: error 4.0 (V - G = -2), inside the clip
    values = t([[1.0, 0.5, 7.0], [-2.0, 7.0, 7.0]])
    returns = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = {
        aggregation: value_clip_loss(
            values, values.clone(), returns, mask, clip_range=5.0, aggregation=aggregation
        ).loss.item()
        for aggregation in ("token_mean", "sequence_mean")
    }
    assert loss["token_mean"] == pytest.approx(0.5 * (1.0 + 0.25 + 4.0) / 3)
    assert loss["sequence_mean"] == pytest.approx(0.5 * ((1.0 + 0.25) / 2 + 4.0) / 2)


# ---------------------------------------------------------------------------------------------
# Reward shaping and PPO-Lagrangian
# ---------------------------------------------------------------------------------------------

KL = [[0.5, -0.2, 1.0, 9.0], [2.0, 9.0, 9.0, 9.0], [0.1, 0.3, 0.2, 0.4], [9.0, 9.0, 9.0, 9.0]]
SHAPE_MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]


def test_clip_scores_clamps_to_the_limit_and_none_is_off():
    scores = t([-60.0, -3.0, 49.9, 70.0])
    assert clip_scores(scores, 50.0).tolist() == [-50.0, -3.0, 49.9, 50.0]
    assert clip_scores(scores, None) is scores


def test_penalise_missing_eos_lowers_only_the_responses_that_did_not_end():
    scores = t([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    assert penalise_missing_eos(scores, ended, 0.5).tolist() == [1.0, 1.5, 3.0]
    assert penalise_missing_eos(scores, ended, None) is scores


def test_shaped_rewards_score_at_last_valid_token():
    score = t([1.0, -2.0, 3.0, 5.0])
    rewards = shaped_rewards(score, t(KL), torch.tensor(SHAPE_MASK), kl_coef=0.1)
    expected = [
        [-0.05, 0.02, -0.1 + 1.0, 0.0],
        [-0.2 - 2.0, 0.0, 0.0, 0.0],
        [-0.01, -0.03, -0.02, -0.04 + 3.0],
        [0.0, 0.0, 0.0, 0.0],  # an empty row has no last token: the score is dropped
    ]
    for row, row_expected in zip(rewards.tolist(), expected, strict=True):
        assert row == pytest.approx(row_expected)


def test_shaped_costs_add_kl_with_the_opposite_sign():
    score = t([1.0, -2.0, 3.0, 5.0])
    costs = shaped_costs(score, t(KL), torch.tensor(SHAPE_MASK, dtype=torch.bool), kl_coef=0.1)
    expected = [
        [0.05, -0.02, 0.1 + 1.0, 0.0],
        [0.2 - 2.0, 0.0, 0.0, 0.0],
        [0.01, 0.03, 0.02, 0.04 + 3.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    for row, row_expected in zip(costs.tolist(), expected, strict=True):
        assert row == pytest.approx(row_expected)


def test_combined_advantages_hand_values():
    reward_adv, cost_adv = t([[1.0, 2.0]]), t([[0.5, -1.0]])
    assert combined_advantages(reward_adv, cost_adv, 0.0).tolist() == [[1.0, 2.0]]
    # λ = 1: (1 - 0.5) / 2, (2 + 1) / 2
    assert combined_advantages(reward_adv, cost_adv, 1.0)[0].tolist() == pytest.approx([0.25, 1.5])
    # λ = 3 as a tensor with a gradient: (1 - 1.5) / 4, (2 + 3) / 4, and λ gets no gradient
    lam = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    result = combined_advantages(reward_adv, cost_adv, lam)
    assert result[0].tolist() == pytest.approx([-0.125, 1.25])
    assert not result.requires_grad


@pytest.mark.parametrize("lagrange_lambda", [0.0, 1.0, 4.0])
def test_combined_kl_weight_stays_kl_coef_for_any_lambda(lagrange_lambda):
    kl, mask, zero = t(KL), torch.tensor(SHAPE_MASK), torch.zeros(4, dtype=torch.float64)
    rewards = shaped_rewards(zero, kl, mask, kl_coef=0.1)
    costs = shaped_costs(zero, kl, mask, kl_coef=0.1)
    combined = combined_advantages(rewards, costs, lagrange_lambda)
    expected = torch.where(mask.bool(), -0.1 * kl, 0.0)
    torch.testing.assert_close(combined, expected)


@pytest.mark.parametrize(
    ("episode_cost", "moves"), [(2.0, "up"), (torch.tensor([0.1, 0.3]), "down")]
)
def test_lagrange_loss_gradient_sign_and_sgd_step(episode_cost, moves):
    log_lambda = torch.nn.Parameter(torch.tensor(0.0))  # λ = 1
    loss = lagrange_loss(log_lambda, episode_cost, cost_limit=0.5)
    mean_cost = 2.0 if moves == "up" else 0.2
    assert loss.item() == pytest.approx(-(mean_cost - 0.5) * 1.0)
    loss.backward()
    assert log_lambda.grad.item() == pytest.approx(-(mean_cost - 0.5))
    torch.optim.SGD([log_lambda], lr=0.1).step()
    assert log_lambda.item() == pytest.approx(0.1 * (mean_cost - 0.5))
    assert (log_lambda.exp().item() > 1.0) == (moves == "up")


def test_lagrange_loss_does_not_train_the_cost():
    log_lambda = torch.nn.Parameter(torch.tensor(math.log(2.0)))
    cost = torch.tensor(1.5, requires_grad=True)
    lagrange_loss(log_lambda, cost, cost_limit=1.0).backward()
    assert cost.grad is None
    assert log_lambda.grad.item() == pytest.approx(-0.5 * 2.0)


def test_clamp_log_lambda_keeps_lambda_at_most_lambda_max():
    log_lambda = torch.nn.Parameter(torch.tensor(0.0))
    optimizer = torch.optim.SGD([log_lambda], lr=0.5)
    seen = []
    for _ in range(30):  # cost far above the limit: λ is pushed up every step
        optimizer.zero_grad()
        lagrange_loss(log_lambda, 10.0, cost_limit=0.0).backward()
        optimizer.step()
        same = clamp_log_lambda_(log_lambda, lambda_max=5.0)
        assert same is log_lambda and log_lambda.requires_grad
        seen.append(log_lambda.exp().item())
    assert max(seen) <= 5.0 + 1e-6
    assert seen[-1] == pytest.approx(5.0)
    assert clamp_log_lambda_(torch.tensor(math.log(0.5)), 5.0).exp().item() == pytest.approx(0.5)
