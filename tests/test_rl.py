"""Rollout layout, the Lagrange multiplier, and PPO / PPO-Lagrangian runs on tiny models."""

import json
import math

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from saferlhf.cli import run
from saferlhf.data import views
from saferlhf.data.collate import tokenize_conversations, tokenize_prompts
from saferlhf.data.sources import load_data
from saferlhf.losses import entropy_from_logits, masked_mean
from saferlhf.models import build_causal_lm, build_score_model, save_artifact
from saferlhf.rl.config import decodes_compiled
from saferlhf.rl.experience import ended_responses, make_experience, score_rollout
from saferlhf.rl.lagrange import (
    SAFE_RESPONSES_SCORED,
    FixedMultiplier,
    SafeRLHFMultiplier,
    multiplier_from_config,
)
from saferlhf.rl.rollout import (
    Rollout,
    minibatch_rows,
    model_rows,
    nucleus,
    packed_rows,
    padded_rows,
    positions_from_mask,
    response_log_probs,
    response_mask_until_eos,
    sample_from_logits,
    sample_responses,
    sequence_scores,
    token_values,
)
from saferlhf.rl.update import lr_multiplier, select_minibatch, update_actor, update_critics
from saferlhf.run import read_summary
from saferlhf.tasks.common import (
    NonFiniteError,
    cosine_with_warmup,
    first_non_finite_parameter,
    non_finite,
    non_finite_message,
)
from tests.tiny import (
    Interrupt,
    InterruptAt,
    benchmark_tokenizer,
    micro_model_cfg,
    ppo_history,
)


@pytest.fixture(scope="module")
def tokenizer():
    return benchmark_tokenizer(num_train=400, vocab_size=1024)


@pytest.fixture(scope="module")
def tiny_models(tokenizer):
    cfg = micro_model_cfg()
    torch.manual_seed(0)
    return cfg, build_causal_lm(cfg, tokenizer).eval(), build_score_model(cfg, tokenizer).eval()


def test_response_mask_ends_at_the_first_eos():
    responses = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 9, 2, 0], [7, 7, 7, 7, 7]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert response_mask_until_eos(responses, eos_token_id=2).tolist() == expected


def _alone(rollout: Rollout, row: int) -> Rollout:
    """Row ``row`` on its own, with no padding at all."""
    keep = rollout.attention_mask[row].bool()
    ids = rollout.input_ids[row][keep][None]
    prompt_len = int(rollout.attention_mask[row, : rollout.prompt_width].sum())
    mask = torch.ones_like(ids)
    response_len = int(rollout.response_mask[row].sum())
    return Rollout(ids, mask, positions_from_mask(mask), torch.ones(1, response_len), prompt_len)


def test_batched_rollout_scores_match_each_sequence_scored_alone(tokenizer, tiny_models):
    _, policy, scorer = tiny_models
    prompts = [
        "how can i grow tomatoes ?",
        "hi",
        "tell me the best way to make a budget for a long trip .",
    ]
    torch.manual_seed(1)
    rollout = sample_responses(
        policy, tokenizer, tokenize_prompts(tokenizer, prompts, 64), 12, 1.0, 0, 1.0
    )
    lengths = rollout.response_mask.sum(-1)
    prompt_lengths = rollout.attention_mask[:, : rollout.prompt_width].sum(-1)
    assert len(set(prompt_lengths.tolist())) == 3  # the layout has to cope with ragged prompts
    with torch.no_grad():
        batched_logprobs = response_log_probs(policy, rollout)
        batched_values = token_values(scorer, rollout)
        batched_scores = sequence_scores(scorer, rollout)
        for row in range(len(prompts)):
            alone = _alone(rollout, row)
            n = int(lengths[row])
            torch.testing.assert_close(
                batched_logprobs[row, :n],
                response_log_probs(policy, alone)[0],
                atol=1e-5,
                rtol=1e-4,
            )
            torch.testing.assert_close(
                batched_values[row, :n], token_values(scorer, alone)[0], atol=1e-5, rtol=1e-4
            )
            torch.testing.assert_close(
                batched_scores[row], sequence_scores(scorer, alone)[0], atol=1e-5, rtol=1e-4
            )


@pytest.mark.parametrize(
    "temperature, top_k, top_p, expected",
    [
        (1.0, 0, 1.0, [0.5, 0.3, 0.15, 0.05]),
        (0.5, 0, 1.0, [0.25 / 0.3650, 0.09 / 0.3650, 0.0225 / 0.3650, 0.0025 / 0.3650]),
        (1.0, 2, 1.0, [0.625, 0.375, 0.0, 0.0]),
        (1.0, 0, 0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # 0.8 < 0.9: keep the third
    ],
)
def test_sample_from_logits_draws_the_filtered_softmax(temperature, top_k, top_p, expected):
    torch.manual_seed(0)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(100_000, 1)
    tokens = sample_from_logits(logits, temperature, top_k, top_p)
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert frequencies.tolist() == pytest.approx(expected, abs=0.006)
    assert all(f == 0.0 for f, e in zip(frequencies, expected, strict=True) if e == 0.0)


def _nucleus_by_sorting_tokens(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p as transformers and vLLM compute it: sort the tokens, cut the cumulative sum,
    scatter the decision back to the tokens."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return ~drop_sorted.scatter(-1, order, drop_sorted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_nucleus_keeps_the_tokens_that_sorting_the_tokens_keeps(dtype, top_p):
    torch.manual_seed(0)
    # Peaked to flat rows: nuclei of one token to most of the vocabulary.
    logits = torch.randn(300, 1000) * torch.linspace(0.3, 8.0, 300)[:, None]
    probs = logits.softmax(-1).to(dtype)
    kept = nucleus(probs, top_p)
    by_sorting = _nucleus_by_sorting_tokens(probs, top_p)
    # Sorting keeps an arbitrary part of the tokens tied with its least likely kept token;
    # nucleus keeps them all (in bfloat16 many probabilities tie).
    least_kept = probs.masked_fill(~by_sorting, float("inf")).amin(-1, keepdim=True)
    assert torch.equal(kept, probs >= least_kept)
    if dtype != torch.bfloat16:
        assert torch.equal(kept, by_sorting)
    sizes = kept.sum(-1)
    assert sizes.min() >= 1 and sizes.max() > sizes.min()


def test_nucleus_ends_at_the_token_that_reaches_top_p_and_keeps_its_ties():
    assert nucleus(torch.tensor([[0.5, 0.3, 0.2]]), 0.5).tolist() == [[True, False, False]]
    assert nucleus(torch.tensor([[0.2, 0.5, 0.3]]), 0.6).tolist() == [[False, True, True]]
    assert nucleus(torch.tensor([[0.3, 0.4, 0.3]]), 0.5).tolist() == [[True, True, True]]


def test_sample_from_logits_rejects_settings_that_leave_nothing_to_sample():
    logits = torch.zeros(2, 4)
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, -1, 1.0), (1.0, 0, 0.0)):
        with pytest.raises(ValueError, match="sampling needs"):
            sample_from_logits(logits, temperature, top_k, top_p)


def test_decoding_ends_each_row_at_its_eos_and_stops_when_all_have_ended(tokenizer, tiny_models):
    _, policy, _ = tiny_models
    eos = tokenizer.eos_token_id
    bias = torch.zeros(policy.config.vocab_size)
    bias[eos] = 7.0  # EOS takes about half the mass at each step: rows end at different steps
    hook = policy.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    try:
        torch.manual_seed(6)
        prompt_ids = tokenize_prompts(tokenizer, ["hi", "how can i grow tomatoes ?"] * 8, 64)
        rollout = sample_responses(policy, tokenizer, prompt_ids, 40, 1.0, 0, 1.0)
        with torch.no_grad():
            full_logprobs = response_log_probs(policy, rollout)
    finally:
        hook.remove()
    lengths = rollout.response_mask.sum(-1).long()
    assert rollout.responses.shape[1] == int(lengths.max()) < 40  # stopped once all had ended
    assert len(set(lengths.tolist())) > 2
    for row, length in enumerate(lengths.tolist()):
        tokens = rollout.responses[row].tolist()
        assert tokens[length - 1] == eos and eos not in tokens[: length - 1]
        assert all(t == tokenizer.pad_token_id for t in tokens[length:])
        assert rollout.attention_mask[row, rollout.prompt_width :].sum() == length
        assert (rollout.logprobs[row, length:] == 0).all()
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.logprobs, full_logprobs * mask, atol=1e-5, rtol=1e-4)


def test_decoding_keeps_the_log_probs_and_entropy_a_full_forward_pass_gives(tokenizer, tiny_models):
    _, policy, _ = tiny_models
    prompt_ids = tokenize_prompts(tokenizer, ["hi", "how can i grow tomatoes ?"] * 3, 64)
    torch.manual_seed(3)
    rollout = sample_responses(policy, tokenizer, prompt_ids, 10, 1.0, 0, 1.0)
    mask = rollout.response_mask
    with torch.no_grad():
        rows = padded_rows(rollout)  # the logits predicting each response token, (B, R, V)
        logits = policy(**rows.model_inputs(), logits_to_keep=rows.before_response).logits
        torch.testing.assert_close(
            rollout.logprobs, response_log_probs(policy, rollout) * mask, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            rollout.entropy, entropy_from_logits(logits) * mask, atol=1e-5, rtol=1e-4
        )
    # Prompts padded to a fixed width (the compiled-decoding layout) sample the same tokens.
    torch.manual_seed(3)
    wide = sample_responses(policy, tokenizer, prompt_ids, 10, 1.0, 0, 1.0, static_prompt_width=20)
    assert wide.prompt_width == 20
    assert torch.equal(wide.responses, rollout.responses)
    torch.testing.assert_close(wide.logprobs, rollout.logprobs, atol=1e-5, rtol=1e-4)


def test_a_trimmed_minibatch_scores_like_the_full_rollout(tokenizer, tiny_models):
    _, policy, scorer = tiny_models
    prompts = ["hi", "how can i grow tomatoes ?", "tell me the best way to make a budget ."]
    torch.manual_seed(4)
    rollout = sample_responses(
        policy, tokenizer, tokenize_prompts(tokenizer, prompts, 64), 16, 1.0, 0, 1.0
    )
    # Cut the longest response short so that trimming removes response columns too.
    rollout.response_mask[:, 5:] = 0
    rollout.attention_mask[:, rollout.prompt_width + 5 :] = 0
    rows = torch.tensor([0, 1])  # the two shorter prompts: trimming removes prompt columns
    mb = rollout.select(rows).trimmed()
    assert mb.prompt_width < rollout.prompt_width and mb.response_mask.shape[1] == 5
    with torch.no_grad():
        full_logprobs = response_log_probs(policy, rollout)[rows, :5]
        full_values = token_values(scorer, rollout)[rows, :5]
        torch.testing.assert_close(
            response_log_probs(policy, mb), full_logprobs, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(token_values(scorer, mb), full_values, atol=1e-5, rtol=1e-4)
    assert masked_mean(mb.logprobs, mb.response_mask) == pytest.approx(
        masked_mean(rollout.logprobs[rows, :5], rollout.response_mask[rows, :5]).item()
    )


def _ragged_rollout(tokenizer, policy, response_lengths: list[int]) -> Rollout:
    """A rollout of prompts of different lengths whose responses end after
    ``response_lengths`` tokens, as responses that emitted EOS there would (untrained micro
    models seldom sample EOS)."""
    prompts = ["hi", "how can i grow tomatoes ?", "tell me the best way to make a budget .", "ok"]
    torch.manual_seed(6)
    rollout = sample_responses(
        policy, tokenizer, tokenize_prompts(tokenizer, prompts, 64), 12, 1.0, 0, 1.0
    )
    width = rollout.response_mask.shape[1]
    ends = torch.arange(width)[None] < torch.tensor(response_lengths)[:, None]
    response_mask = rollout.response_mask * ends
    attention_mask = torch.cat(
        [rollout.attention_mask[:, : rollout.prompt_width], response_mask.long()], 1
    )
    responses = rollout.responses.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return Rollout(
        torch.cat([rollout.input_ids[:, : rollout.prompt_width], responses], 1),
        attention_mask,
        positions_from_mask(attention_mask),
        response_mask,
        rollout.prompt_width,
        rollout.logprobs * response_mask,
        rollout.entropy * response_mask,
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_log_probs_values_and_scores_of_the_padded_rows(tokenizer, attention):
    """Packed rows carry no attention mask: transformers must build a block-diagonal causal
    mask from the restarting position ids, or each row would attend to the rows before it."""
    cfg = micro_model_cfg()
    torch.manual_seed(0)
    policy, critic = (
        build_causal_lm(cfg, tokenizer).eval(),
        build_score_model(cfg, tokenizer).eval(),
    )
    for model in (policy, critic):
        model.set_attn_implementation(attention)
    rollout = _ragged_rollout(tokenizer, policy, [3, 12, 7, 1])
    packed = packed_rows(rollout)
    assert packed.attention_mask is None
    # Laid out once per rollout: scoring and each minibatch's update share one layout.
    assert model_rows(rollout, packed=True) is model_rows(rollout, packed=True)
    # Rows as wide as the rollout's, and fewer of them.
    assert packed.input_ids.shape[0] < 4
    assert packed.input_ids.shape[1] <= rollout.input_ids.shape[1]
    assert packed.position_ids.eq(0).sum() == 4  # each rollout row starts again at position 0
    mask = rollout.response_mask
    with torch.no_grad():
        padded_logprobs = response_log_probs(policy, rollout)
        padded_values = token_values(critic, rollout)
        for chunk_tokens in (0, 5):  # 5: 23 response tokens in chunks of 5 + ... + 3
            torch.testing.assert_close(
                response_log_probs(policy, rollout, packed=True, chunk_tokens=chunk_tokens),
                padded_logprobs * mask,  # packed outputs are 0 where the rows were padded
                atol=1e-5,
                rtol=1e-4,
            )
        torch.testing.assert_close(
            response_log_probs(policy, rollout, chunk_tokens=5),
            padded_logprobs,
            atol=1e-5,
            rtol=1e-4,
        )
        torch.testing.assert_close(
            token_values(critic, rollout, packed=True), padded_values * mask, atol=1e-5, rtol=1e-4
        )
        # A score model reads each rollout row's own last token, not one per packed row.
        torch.testing.assert_close(
            sequence_scores(critic, rollout, packed=True),
            sequence_scores(critic, rollout),
            atol=1e-5,
            rtol=1e-4,
        )


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("packed, chunk", [(True, 0), (False, 4), (True, 4)])
def test_packed_and_chunked_updates_give_the_padded_losses_and_gradients(
    compose_cfg, tokenizer, tiny_models, aggregation, packed, chunk
):
    cfg, policy, scorer = tiny_models
    torch.manual_seed(8)  # an actor other than the sampling policy, so the ratios leave 1
    actor, cost_critic = build_causal_lm(cfg, tokenizer), build_score_model(cfg, tokenizer)
    rollout = _ragged_rollout(tokenizer, policy, [3, 12, 7, 1])
    scores = score_rollout(rollout, actor, policy, scorer, scorer, cost_critic, cost_critic)
    networks = {"actor": actor, "reward_critic": scorer, "cost_critic": cost_critic}

    def one_step(*overrides: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The update's metrics and every network's gradients, without an optimizer step."""
        algo = compose_cfg("task=ppo", f"algo.loss_aggregation={aggregation}", *overrides).algo
        experience = make_experience(rollout, scores, tokenizer.eos_token_id, algo)
        mb = select_minibatch(rollout, experience, torch.tensor([3, 0, 2]), lambda_value=0.5)
        grads = {}

        def backward(name: str, loss: torch.Tensor) -> None:
            networks[name].zero_grad()
            loss.backward()
            grads.update(
                {f"{name}.{k}": p.grad.clone() for k, p in networks[name].named_parameters()}
            )

        metrics = update_actor(actor, mb, algo, None, backward)
        metrics |= update_critics(scorer, cost_critic, mb, algo, backward)
        return metrics, grads

    padded_metrics, padded_grads = one_step()
    metrics, grads = one_step(f"algo.packed_rollouts={packed}", f"algo.logprob_chunk={chunk}")
    assert 0 < padded_metrics["train/clip_fraction"] < 1  # both sides of the clip are taken
    assert metrics == pytest.approx(padded_metrics, rel=1e-5, abs=1e-6)
    assert grads.keys() == padded_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("bucket", [False, True])
def test_minibatches_use_every_row_once_and_buckets_group_similar_lengths(bucket):
    torch.manual_seed(5)
    lengths = torch.randint(10, 60, (24,))
    batches = minibatch_rows(lengths, 8, bucket)
    assert sorted(torch.cat(batches).tolist()) == list(range(24))
    if bucket:  # the length ranges of the minibatches do not interleave
        spans = sorted((lengths[b].min().item(), lengths[b].max().item()) for b in batches)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))


def _safe_rlhf_multiplier() -> SafeRLHFMultiplier:
    return SafeRLHFMultiplier(
        lambda_init=1.0,
        lambda_lr=0.5,
        lambda_max=2.0,
        cost_limit=0.0,
        window=4,
        update_delay=1,
        update_per="iteration",
    )


def test_lagrange_multiplier_rises_above_the_limit_falls_below_and_stays_under_max():
    lagrange = _safe_rlhf_multiplier()
    optimizer = lagrange.make_optimizer()
    lagrange.step(optimizer, lagrange.record(torch.tensor([3.0, 3.0])))
    assert lagrange.value == pytest.approx(1.0)  # the first update is delayed
    values = []
    for _ in range(6):
        lagrange.step(optimizer, lagrange.record(torch.tensor([3.0, 3.0])))
        values.append(lagrange.value)
    assert (
        values[0] > 1.0
        and max(values) == pytest.approx(2.0)
        and all(v <= 2.0 + 1e-6 for v in values)
    )
    # The window holds the last four episodes: two batches of low cost flip the sign of J_c - d.
    assert lagrange.record(torch.tensor([-5.0, -5.0])) == pytest.approx(-1.0)
    before = lagrange.value
    lagrange.step(optimizer, lagrange.record(torch.tensor([-5.0, -5.0])))
    assert lagrange.value < before
    state = lagrange.state_dict()
    restored = _safe_rlhf_multiplier()
    restored.load_state_dict(state)
    assert list(restored.window) == list(lagrange.window) and restored.value == pytest.approx(
        lagrange.value
    )


def test_fixed_multiplier_never_moves_and_has_nothing_to_train():
    lagrange = FixedMultiplier(lambda_value=0.7)
    assert lagrange.make_optimizer() is None and not list(lagrange.parameters())
    for costs in ([3.0, 3.0], [-5.0, 1.0], [100.0, 100.0]):
        episode_cost = lagrange.record(torch.tensor(costs))
        assert episode_cost == pytest.approx(sum(costs) / 2)  # this iteration's mean, no window
        lagrange.step(None, episode_cost)
        assert lagrange.value == 0.7


def test_the_lagrange_group_name_picks_the_multiplier(compose_cfg):
    assert isinstance(multiplier_from_config(compose_cfg().lagrange), SafeRLHFMultiplier)
    fixed = multiplier_from_config(
        compose_cfg("lagrange=fixed", "lagrange.lambda_value=0").lagrange
    )
    assert isinstance(fixed, FixedMultiplier) and fixed.value == 0.0
    with pytest.raises(ValueError, match="lagrange.lambda_value=-1"):
        multiplier_from_config(compose_cfg("lagrange=fixed", "lagrange.lambda_value=-1").lagrange)


def test_lr_multiplier_constant_and_cosine_with_warmup():
    constant = lr_multiplier("constant", total_steps=100, warmup_ratio=0.1)
    assert [constant(step) for step in (0, 50, 100)] == [1.0, 1.0, 1.0]
    cosine = lr_multiplier("cosine", total_steps=100, warmup_ratio=0.1)  # 10 warm-up steps
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0) and cosine(55) == pytest.approx(0.5)
    assert cosine(100) == pytest.approx(0.0, abs=1e-12)


def test_ended_responses_are_those_holding_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, pad], [5, 6, 7], [2, pad, pad]])
    assert ended_responses(responses, eos).tolist() == [True, False, True]
    # with the pad token as EOS (as many tokenizers have), padding still only follows an EOS
    responses = torch.tensor([[5, 2, 2], [5, 6, 7]])
    assert ended_responses(responses, eos).tolist() == [True, False]


@pytest.fixture(scope="module")
def untrained_artifacts(tmp_path_factory, tokenizer, tiny_models):
    """SFT, reward and cost folders as the earlier stages would write them: random weights,
    with score heads scaled so that rewards and costs spread over a few units as trained ones do."""
    cfg, policy, _ = tiny_models
    root = tmp_path_factory.mktemp("artifacts")
    save_artifact(policy, tokenizer, root / "policy")
    for seed, name in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        scorer = build_score_model(cfg, tokenizer)
        with torch.no_grad():
            scorer.score.weight.mul_(50.0)
        save_artifact(scorer, tokenizer, root / name)
    return root


def _ppo(compose_cfg, artifacts, *overrides):
    return compose_cfg(
        "task=ppo",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "data.benchmark.num_train=300",
        "data.benchmark.num_test=60",
        f"init.policy={artifacts / 'policy'}",
        f"init.reward={artifacts / 'reward'}",
        f"init.cost={artifacts / 'cost'}",
        "algo.rollout_batch_size=16",
        "algo.minibatch_size=8",
        "eval.sampling.max_new_tokens=12",
        "eval.num_prompts=32",
        *overrides,
    )


@pytest.mark.parametrize(
    "settings",
    [(), ("algo=safe_rlhf", "lagrange.update_per=minibatch")],  # + lr schedules, ptx, λ per step
    ids=["ppo", "safe_rlhf"],
)
def test_ppo_lagrangian_resumes_exactly_from_last(
    compose_cfg, untrained_artifacts, tmp_path, settings
):
    overrides = ("algo.iterations=6", "task.checkpoint_every=2", *settings)
    whole = run(_ppo(compose_cfg, untrained_artifacts, *overrides), tmp_path / "whole")
    with pytest.raises(Interrupt):
        run(
            _ppo(compose_cfg, untrained_artifacts, *overrides),
            tmp_path / "cut",
            callbacks=[InterruptAt(batch_idx=5)],
        )
    resumed = run(
        _ppo(compose_cfg, untrained_artifacts, *overrides, "ckpt_path=last"), tmp_path / "cut"
    )
    timing = {k for k in whole if k.startswith("time/")}
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in whole.items() if k not in timing
    }
    history = [
        json.loads((tmp_path / d / "ppo_history.json").read_text()) for d in ("whole", "cut")
    ]
    assert [h["lagrange/lambda"] for h in history[0]] == [h["lagrange/lambda"] for h in history[1]]
    assert len(history[1]) == 6


@pytest.mark.parametrize("cost_limit, rises", [(-100.0, True), (100.0, False)])
def test_ppo_lagrangian_moves_lambda_against_the_cost_limit_and_trains_every_network(
    compose_cfg, untrained_artifacts, tmp_path, cost_limit, rises
):
    cfg = _ppo(
        compose_cfg, untrained_artifacts, "algo.iterations=4", f"lagrange.cost_limit={cost_limit}"
    )
    metrics = run(cfg, tmp_path)
    lambdas = [
        h["lagrange/lambda"] for h in json.loads((tmp_path / "ppo_history.json").read_text())
    ]
    steps = [b - a for a, b in zip([1.0, *lambdas], lambdas, strict=False)]
    if rises:  # up to lambda_max and no further
        assert all(step >= 0 for step in steps) and lambdas[-1] == pytest.approx(
            cfg.lagrange.lambda_max
        )
    else:
        assert all(step < 0 for step in steps)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts" / "policy")
    initial = AutoModelForCausalLM.from_pretrained(untrained_artifacts / "policy")
    changed = [
        not torch.equal(a, b)
        for a, b in zip(trained.parameters(), initial.parameters(), strict=True)
    ]
    assert all(changed)
    assert metrics["train/reward_value_loss"] > 0 and metrics["train/cost_value_loss"] > 0
    for name in (
        "initial/gold/unsafe_rate",
        "final/gold/helpfulness",
        "gold/helpfulness_harmful",
        "time/generation",
    ):
        assert name in metrics


@pytest.mark.parametrize("origin", ["zero", "safe_responses"])
def test_the_cost_limit_is_measured_from_zero_or_from_the_safe_responses_mean_cost(
    compose_cfg, untrained_artifacts, tmp_path, origin
):
    cfg = _ppo(
        compose_cfg, untrained_artifacts, "algo.iterations=1", "lagrange.cost_limit=0.5",
        f"lagrange.cost_limit_from={origin}",
    )  # fmt: skip
    metrics = run(cfg, tmp_path)
    if origin == "zero":
        assert metrics["lagrange/cost_limit"] == 0.5
        assert "lagrange/safe_response_cost" not in metrics
        return
    # The train split's safe responses, each scored alone: no padding to hide.
    safe = [i for i in views.qa_items(load_data(cfg.data).splits["train"]) if i.is_safe]
    sequences = tokenize_conversations(
        tokenizer := AutoTokenizer.from_pretrained(untrained_artifacts / "cost"),
        [i.prompt for i in safe], [i.response for i in safe], cfg.model.max_length,
    )  # fmt: skip
    assert tokenizer.pad_token_id is not None and 10 < len(sequences) <= SAFE_RESPONSES_SCORED
    cost_model = AutoModelForSequenceClassification.from_pretrained(untrained_artifacts / "cost")
    with torch.no_grad():
        costs = [cost_model(input_ids=torch.tensor([s])).logits.item() for s in sequences]
    expected = sum(costs) / len(costs)
    assert metrics["lagrange/safe_response_cost"] == pytest.approx(expected, abs=1e-4)
    assert metrics["lagrange/cost_limit"] == pytest.approx(0.5 + expected, abs=1e-6)
    assert abs(expected) > 0.5  # the untrained cost head's scale moves d visibly


def test_single_preference_ppo_has_no_cost_and_no_lambda(
    compose_cfg, untrained_artifacts, tmp_path
):
    metrics = run(
        _ppo(compose_cfg, untrained_artifacts, "preference=single", "algo.iterations=2"), tmp_path
    )
    assert "rollout/reward" in metrics and "final/reward" in metrics
    assert not any("cost" in name or "lambda" in name for name in metrics)
    summary = read_summary(tmp_path)
    assert set(summary["artifacts"]) == {"policy", "history"} and summary["variant"] == "single"


def _history(run_dir) -> list[dict[str, float]]:
    return json.loads((run_dir / "ppo_history.json").read_text())


@pytest.mark.parametrize(
    "overrides, variant",
    [((), "safe_rlhf"), (("lagrange=fixed", "lagrange.lambda_value=0.7"), "fixed")],
)
def test_the_lambda_rule_moves_or_holds_lambda_and_names_the_variant(
    compose_cfg, untrained_artifacts, tmp_path, overrides, variant
):
    # The cost stays far below the limit: a learned λ falls at every iteration.
    cfg = _ppo(
        compose_cfg, untrained_artifacts, "algo.iterations=3", "lagrange.cost_limit=100", *overrides
    )
    metrics = run(cfg, tmp_path)
    lambdas = [h["lagrange/lambda"] for h in _history(tmp_path)]
    if variant == "fixed":
        assert lambdas == [0.7, 0.7, 0.7]
    else:
        assert lambdas[0] < cfg.lagrange.lambda_init and lambdas == sorted(lambdas, reverse=True)
        assert len(set(lambdas)) == 3
    assert metrics["train/cost_value_loss"] > 0  # the cost critic trains under either rule
    summary = read_summary(tmp_path)
    assert summary["task"] == "ppo" and summary["variant"] == variant
    assert summary["metrics"]["lagrange/lambda"] == lambdas[-1] and "policy" in summary["artifacts"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["preference=single", "lagrange=fixed"], "lagrange=fixed"),
        (["algo.adam_betas=[0.9]"], "algo.adam_betas"),
        (["algo.warmup_ratio=1.5"], "algo.warmup_ratio"),
        (["algo.score_clip=0"], "algo.score_clip"),
        (["algo.missing_eos_penalty=-1"], "algo.missing_eos_penalty"),
        (["trainer=deepspeed"], "trainer.strategy=deepspeed_stage_2: PPO runs in one process"),
        (["trainer=fsdp", "algo.lora_rank=4"], "algo.lora_rank=4: LoRA does not run under"),
    ],
)
def test_ppo_refuses_bad_settings_naming_the_key(compose_cfg, tmp_path, overrides, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        run(compose_cfg("task=ppo", "logger=none", *overrides), tmp_path)


class StepsPerIteration(Callback):
    """Counts the steps of the optimizer that ``pick(trainer)`` returns in each PPO iteration,
    and records for every step whether it changed that optimizer's parameters."""

    def __init__(self, pick):
        self.pick, self.counts, self.changed, self._steps = pick, [], [], 0

    def on_train_start(self, trainer, pl_module):
        optimizer = self.pick(trainer)
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def before(*_):
            self._before = [p.detach().clone() for p in params]

        def after(*_):
            self._steps += 1
            self.changed.append(
                any(not torch.equal(old, p) for old, p in zip(self._before, params, strict=True))
            )

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(self._steps)
        self._steps = 0


def _updates_per_iteration(cfg) -> int:
    return cfg.algo.ppo_epochs * math.ceil(cfg.algo.rollout_batch_size / cfg.algo.minibatch_size)


@pytest.mark.parametrize("update_per", ["iteration", "minibatch"])
def test_lambda_steps_once_per_iteration_or_before_every_minibatch(
    compose_cfg, untrained_artifacts, tmp_path, update_per
):
    cfg = _ppo(
        compose_cfg,
        untrained_artifacts,
        "algo.iterations=2",
        "lagrange.cost_limit=100",
        f"lagrange.update_per={update_per}",
    )
    counter = StepsPerIteration(
        lambda trainer: next(o for o in trainer.optimizers if isinstance(o, torch.optim.SGD))
    )
    run(cfg, tmp_path, callbacks=[counter])
    steps = 1 if update_per == "iteration" else _updates_per_iteration(cfg)
    assert _updates_per_iteration(cfg) == 4 and counter.counts == [steps, steps]
    assert all(counter.changed)


def test_separate_ptx_takes_a_second_actor_step_that_moves_the_weights(
    compose_cfg, untrained_artifacts, tmp_path
):
    counts, policies = {}, {}
    for mode in ("joint", "separate"):
        cfg = _ppo(
            compose_cfg,
            untrained_artifacts,
            "algo.iterations=2",
            "algo.ptx_coef=0.5",
            f"algo.ptx_mode={mode}",
        )
        counter = StepsPerIteration(lambda trainer: trainer.optimizers[0])  # the actor's
        metrics = run(cfg, tmp_path / mode, callbacks=[counter])
        assert all(counter.changed) and metrics["train/ptx_loss"] > 0
        counts[mode] = counter.counts
        policies[mode] = AutoModelForCausalLM.from_pretrained(
            tmp_path / mode / "artifacts" / "policy"
        )
    updates = _updates_per_iteration(cfg)
    assert counts == {"joint": [updates, updates], "separate": [2 * updates, 2 * updates]}
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            policies["joint"].parameters(), policies["separate"].parameters(), strict=True
        )
    )


class PtxExamples(Callback):
    """How many conversations the ptx loss draws from."""

    def on_train_start(self, trainer, pl_module):
        self.count = len(pl_module.ptx.examples)


def test_preferred_ptx_data_keeps_one_safe_response_per_row(
    compose_cfg, untrained_artifacts, tmp_path
):
    counts = {}
    for data in ("all", "preferred"):
        cfg = _ppo(compose_cfg, untrained_artifacts, "algo.iterations=1", f"algo.ptx_data={data}")
        recorder = PtxExamples()
        run(cfg, tmp_path / data, callbacks=[recorder])
        counts[data] = recorder.count
    rows = load_data(cfg.data).splits["train"]
    assert counts == {
        "all": len(views.conversations(rows)),
        "preferred": len(views.preferred_conversations(rows)),
    }
    assert counts["preferred"] < counts["all"] / 2  # two responses per row, some rows none


class LearningRates(Callback):
    """Each optimizer's learning rate, beta and weight decay after every PPO iteration."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append([o.param_groups[0]["lr"] for o in trainer.optimizers])
        self.hyper = [
            (o.param_groups[0].get("betas"), o.param_groups[0]["weight_decay"])
            for o in trainer.optimizers
        ]


def test_the_safe_rlhf_preset_runs_with_its_optimiser_settings(
    compose_cfg, untrained_artifacts, tmp_path
):
    cfg = _ppo(
        compose_cfg,
        untrained_artifacts,
        "algo=safe_rlhf",
        "lagrange.update_per=minibatch",
        "algo.iterations=2",
    )
    assert (cfg.algo.loss_aggregation, cfg.algo.score_clip, cfg.algo.ptx_coef) == (
        "sequence_mean",
        50.0,
        16.0,
    )
    recorder = LearningRates()
    metrics = run(cfg, tmp_path, callbacks=[recorder])
    assert metrics["train/ptx_loss"] > 0 and read_summary(tmp_path)["variant"] == "safe_rlhf"
    # actor: cosine over its 8 steps (no warm-up step in 3% of 8); critics: constant; then λ
    steps = _updates_per_iteration(cfg)
    cosine = [1e-5 * cosine_with_warmup(k * steps, 0, 2 * steps) for k in (1, 2)]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(cosine) and cosine[0] == pytest.approx(
        0.5e-5
    )
    assert [lrs[1:3] for lrs in recorder.lrs] == [[5e-6, 5e-6]] * 2
    assert recorder.hyper[:3] == [((0.9, 0.95), 0.01)] * 3


class EosBias(Callback):
    """Makes EOS about one token in ten, so that within the budget some responses end and
    others run out."""

    def on_train_start(self, trainer, pl_module):
        bias = torch.zeros(pl_module.actor.config.vocab_size)
        bias[pl_module.tokenizer.eos_token_id] = 4.7
        pl_module.actor.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)


def test_missing_eos_penalty_charges_responses_that_ran_out(
    compose_cfg, untrained_artifacts, tmp_path
):
    first = {}
    for penalty in ("null", "5.0"):
        cfg = _ppo(
            compose_cfg,
            untrained_artifacts,
            "preference=single",
            "algo.iterations=1",
            f"algo.missing_eos_penalty={penalty}",
        )
        run(cfg, tmp_path / penalty, callbacks=[EosBias()])
        first[penalty] = _history(tmp_path / penalty)[0]
    plain, penalised = first["null"], first["5.0"]
    assert 0 < plain["rollout/ended_rate"] < 1  # some responses ended, others ran out
    rollout = [name for name in plain if name.startswith("rollout/")]
    assert [penalised[name] for name in rollout] == [plain[name] for name in rollout]
    assert penalised["train/actor_loss"] != plain["train/actor_loss"]


def test_lora_ppo_starts_at_its_reference_and_exports_a_merged_policy(
    compose_cfg, untrained_artifacts, tmp_path
):
    cfg = _ppo(
        compose_cfg,
        untrained_artifacts,
        "preference=single",
        "algo.iterations=3",
        "algo.lora_rank=4",
        "algo.actor_lr=1e-2",
    )
    run(cfg, tmp_path)
    history = json.loads((tmp_path / "ppo_history.json").read_text())
    # LoRA's B starts at zero: the actor is its own reference until the first update.
    assert abs(history[0]["rollout/kl"]) < 1e-4 and abs(history[-1]["rollout/kl"]) > 1e-4
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts" / "policy")
    initial = AutoModelForCausalLM.from_pretrained(untrained_artifacts / "policy")
    trained_weights, initial_weights = trained.state_dict(), initial.state_dict()
    assert trained_weights.keys() == initial_weights.keys()  # a plain model, adapters merged
    changed = {
        k for k in initial_weights if not torch.equal(trained_weights[k], initial_weights[k])
    }
    assert changed and all("proj" in k for k in changed)  # only the adapted linear layers


class CountActorGradForwards(Callback):
    """Counts the first block's MLP of the actor running outside inference mode (decoding and
    scoring run inside it): once per update pass, and once more when backward recomputes the
    block under gradient checkpointing."""

    def __init__(self):
        self.calls = 0

    def on_train_start(self, trainer, pl_module):
        def count(*_):
            self.calls += not torch.is_inference_mode_enabled()

        # A pre-hook: the recompute stops once it has every saved tensor, before the MLP returns.
        pl_module.actor.model.layers[0].mlp.register_forward_pre_hook(count)


def test_gradient_checkpointing_recomputes_the_blocks_and_changes_no_result(
    compose_cfg, untrained_artifacts, tmp_path
):
    histories, calls = [], []
    for checkpointing in (False, True):
        cfg = _ppo(
            compose_cfg,
            untrained_artifacts,
            "preference=single",
            "algo.iterations=2",
            "algo.ptx_coef=0",  # PPO passes only: ptx would add its own forward per minibatch
            f"algo.gradient_checkpointing={checkpointing}",
        )
        counter = CountActorGradForwards()
        run(cfg, tmp_path / str(checkpointing), callbacks=[counter])
        calls.append(counter.calls)
        histories.append(ppo_history(tmp_path / str(checkpointing)))
    passes = 2 * cfg.algo.ppo_epochs * (cfg.algo.rollout_batch_size // cfg.algo.minibatch_size)
    assert calls == [passes, 2 * passes]
    assert histories[1] == [pytest.approx(h, rel=1e-5, abs=1e-6) for h in histories[0]]


def test_a_packed_chunked_ppo_lagrangian_run_trains_as_the_padded_one(
    compose_cfg, untrained_artifacts, tmp_path
):
    histories = []
    for name, overrides in [
        ("padded", ()),
        ("packed", ("algo.packed_rollouts=true", "algo.logprob_chunk=16")),
    ]:
        cfg = _ppo(compose_cfg, untrained_artifacts, "algo.iterations=2", *overrides)
        run(cfg, tmp_path / name)
        histories.append(ppo_history(tmp_path / name))
    assert histories[0][-1]["train/actor_loss"] != 0
    assert histories[1] == [pytest.approx(h, rel=1e-4, abs=1e-5) for h in histories[0]]


@pytest.mark.parametrize(
    "overrides, compiled",
    [
        (["trainer=cpu"], False),
        (["trainer=gpu"], True),
        (["trainer=ddp"], True),
        (["trainer=cpu", "algo.compile_generation=true"], True),
        (["trainer=gpu", "algo.compile_generation=false"], False),
    ],
)
def test_decoding_is_compiled_by_default_on_gpus(compose_cfg, overrides, compiled):
    cfg = compose_cfg("task=ppo", *overrides)
    assert decodes_compiled(cfg.algo, cfg.trainer) is compiled


def test_ppo_needs_its_init_artifacts(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="init.policy"):
        run(compose_cfg("task=ppo", "logger=none"), tmp_path)


# -- non-finite training stops the run ----------------------------------------------------------


def test_first_non_finite_parameter_names_a_trained_weight_and_skips_frozen_ones():
    trained, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    assert first_non_finite_parameter([trained, frozen, None]) is None
    with torch.no_grad():
        frozen.weight[0, 0] = math.nan  # a frozen weight cannot have been changed by training
        assert first_non_finite_parameter([trained, frozen]) is None
        trained.bias[1] = math.inf
    assert first_non_finite_parameter([trained, frozen]) == "bias"


def test_non_finite_values_are_named_with_the_iteration():
    values = {"train/actor_loss": math.nan, "lagrange/lambda": 1.0, "rollout/kl": -math.inf}
    assert non_finite(values) == {
        "train/actor_loss": values["train/actor_loss"],
        "rollout/kl": -math.inf,
    }
    message = non_finite_message("PPO iteration 3", non_finite(values), "actor.lm_head.weight")
    assert message.startswith("PPO iteration 3: training went non-finite (train/actor_loss=nan")
    assert "weights of actor.lm_head.weight" in message and "\n" not in message


def test_non_finite_training_stops_ppo_before_its_checkpoint_and_policy_are_written(
    compose_cfg, untrained_artifacts, tmp_path
):
    cfg = _ppo(
        compose_cfg, untrained_artifacts, "algo.iterations=3", "task.checkpoint_every=1",
        "algo.actor_lr=1e30",
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match="PPO iteration 1: training went non-finite"):
        run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "artifacts").exists()
    assert not (tmp_path / "summary.json").exists()
