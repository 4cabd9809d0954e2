"""Rollouts: sample responses with the KV cache and lay them out for scoring and updates.

Layout (``Rollout``): each row is ``[left pad | prompt | response | right pad]``, with every
prompt ending at column ``prompt_width``. Response token ``t`` sits at column
``prompt_width + t`` in every row, so per-token quantities are ``(B, R)`` tensors aligned at
index 0, and the logits that predict them are columns ``prompt_width - 1 ... -2``. Explicit
``position_ids`` make left padding invisible to the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from saferlhf.data.collate import pad_sequences
from saferlhf.losses import selective_log_softmax
from saferlhf.models.sharding import gathered_for_decoding, inference_context


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R), 1.0 up to and including EOS
    prompt_width: int  # P
    # (B, R): log-probability of each sampled token, and the entropy of the distribution it was
    # drawn from, under the sampling model's raw logits; kept from the decoding loop so that PPO
    # needs no extra forward pass for its old log-probs.
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:  # (B, R)
        return self.input_ids[:, self.prompt_width :]

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            self.response_mask[index],
            self.prompt_width,
            self.logprobs[index] if self.logprobs is not None else None,
            self.entropy[index] if self.entropy is not None else None,
        )

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in every row (the left pad
        beyond the longest prompt, the right pad beyond the longest response), so a minibatch
        costs what its own longest row costs. Per-token ``(B, R)`` tensors of the full rollout
        match the trimmed one after ``[:, :trimmed.response_mask.shape[1]]``."""
        longest_prompt = int(self.attention_mask[:, : self.prompt_width].sum(-1).max())
        longest_response = int(self.response_mask.sum(-1).max())
        columns = slice(self.prompt_width - longest_prompt, self.prompt_width + longest_response)
        return Rollout(
            self.input_ids[:, columns],
            self.attention_mask[:, columns],
            self.position_ids[:, columns],
            self.response_mask[:, :longest_response],
            longest_prompt,
            self.logprobs[:, :longest_response] if self.logprobs is not None else None,
            self.entropy[:, :longest_response] if self.entropy is not None else None,
        )


def minibatch_rows(
    lengths: torch.Tensor, minibatch_size: int, bucket_by_length: bool
) -> list[torch.Tensor]:
    """Row indices of each minibatch of one PPO epoch, in a random order.

    With ``bucket_by_length`` rows of similar ``lengths`` (tokens per row) share a minibatch,
    ties broken at random, so that a trimmed minibatch (:meth:`Rollout.trimmed`) carries little
    padding; every row is still used exactly once per epoch.
    """
    order = torch.randperm(len(lengths), device=lengths.device)
    if not bucket_by_length:
        return list(order.split(minibatch_size))
    order = order[lengths[order].argsort(stable=True)]
    minibatches = order.split(minibatch_size)
    return [minibatches[i] for i in torch.randperm(len(minibatches)).tolist()]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only attended tokens, so left padding does not shift positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_mask_until_eos(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on every token up to and including the first EOS of each row, 0 after it."""
    is_eos = (responses == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before this position
    return (eos_before == 0).float()


def sample_from_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """One token per row of ``(B, V)`` logits: softmax(logits / temperature) restricted to the
    ``top_k`` most likely tokens (0: all) and to the smallest set holding ``top_p`` of the mass."""
    if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"sampling needs temperature > 0, top_k >= 0 and 0 < top_p <= 1; got temperature="
            f"{temperature}, top_k={top_k}, top_p={top_p}"
        )
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the top token stays
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return sample_from_probs(logits.softmax(-1))


def sample_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of a ``(B, V)`` probability table (rows need not sum to exactly 1).

    Draws by inverting the cumulative distribution with one uniform number per row, which
    samples exactly ``probs``; on CPU ``torch.multinomial`` costs ten times as much per draw and
    took a quarter of the decoding time.
    """
    cumulative = probs.cumsum(-1)
    draw = torch.rand_like(cumulative[:, -1:]) * cumulative[:, -1:]
    # right=True skips tokens of zero probability; the clamp only guards float round-off
    return (
        torch.searchsorted(cumulative, draw, right=True)
        .squeeze(-1)
        .clamp_(max=cumulative.shape[-1] - 1)
    )


def sample_responses(
    actor: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    static_prompt_width: int | None = None,
    compile_decoding: bool = False,
) -> Rollout:
    """Sample one response per prompt, decoding with a KV cache until every row has ended.

    The cache is a preallocated :class:`~transformers.StaticCache` (written in place; a growing
    cache re-concatenates every layer's keys and values at each step), and one attention mask
    covers every slot (the causal mask hides the slots not yet written). The loop keeps the
    log-probability of each sampled token under the actor's raw logits (``Rollout.logprobs``).
    ``static_prompt_width`` left pads the prompts to a fixed width, so that the decoding step
    has the same shapes in every call; ``compile_decoding`` then runs it through
    ``torch.compile`` (CUDA graphs on a GPU).
    """
    # Eval mode: no dropout, and gradient checkpointing (active in train mode) drops the cache.
    was_training = actor.training
    actor.eval()
    try:
        with inference_context(actor), gathered_for_decoding(actor):
            rollout = _decode(
                actor,
                tokenizer,
                prompt_ids,
                max_new_tokens,
                sampling=(temperature, top_k, top_p),
                static_prompt_width=static_prompt_width,
                compile_decoding=compile_decoding,
            )
    finally:
        actor.train(was_training)
    # Inference tensors cannot be saved for backward (the update embeds input_ids); copies can.
    copies = {
        f.name: value.clone() if isinstance(value, torch.Tensor) else value
        for f in fields(rollout)
        for value in [getattr(rollout, f.name)]
    }
    return Rollout(**copies)


def _decode(
    actor: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: tuple[float, int, float],
    static_prompt_width: int | None,
    compile_decoding: bool,
) -> Rollout:
    device = actor.device
    prompts, prompt_mask = pad_sequences(
        prompt_ids, tokenizer.pad_token_id, side="left", width=static_prompt_width
    )
    prompts, prompt_mask = prompts.to(device), prompt_mask.to(device)
    batch, width = prompts.shape
    # Each step writes the next slot of the cache (it counts what it holds): it must start empty.
    cache = StaticCache(config=actor.config, max_cache_len=width + max_new_tokens)
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], 1)
    positions = positions_from_mask(prompt_mask)
    logits = actor(
        input_ids=prompts,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    decode = actor.get_compiled_call(None) if compile_decoding else actor
    next_position = positions[:, -1:] + 1
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id  # looked up once, not per step
    # At the default settings the sampling distribution is the raw softmax: draw from the
    # probabilities computed for the log-probs and entropy instead of normalising twice.
    unfiltered = sampling == (1.0, 0, 1.0)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs, entropies = [], [], []
    for step in range(max_new_tokens):
        logits = logits.float()
        log_distribution = logits.log_softmax(-1)
        distribution = log_distribution.exp()
        token = (
            sample_from_probs(distribution) if unfiltered else sample_from_logits(logits, *sampling)
        )
        token = token.masked_fill(finished, pad_id)
        tokens.append(token)
        logprobs.append(log_distribution.gather(-1, token[:, None]).squeeze(-1))
        entropies.append(-(distribution * log_distribution).sum(-1))
        finished |= token == eos_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = decode(
            input_ids=token[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
        next_position = next_position + 1
    responses = torch.stack(tokens, 1)
    response_mask = response_mask_until_eos(responses, eos_id)
    responses = responses.masked_fill(response_mask == 0, pad_id)
    input_ids = torch.cat([prompts, responses], dim=1)
    full_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return Rollout(
        input_ids,
        full_mask,
        positions_from_mask(full_mask),
        response_mask,
        width,
        torch.stack(logprobs, 1) * response_mask,
        torch.stack(entropies, 1) * response_mask,
    )


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    return tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)


def response_logits(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Logits predicting each response token, ``(B, R, V)``; the LM head runs on those
    positions only (the prompt's logits would be computed and thrown away)."""
    predicting = torch.arange(
        rollout.prompt_width - 1, rollout.input_ids.shape[1] - 1, device=rollout.input_ids.device
    )
    return model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        use_cache=False,
        logits_to_keep=predicting,
    ).logits


def response_log_probs(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Log-probability of each sampled response token under ``model``, ``(B, R)``."""
    return selective_log_softmax(response_logits(model, rollout).float(), rollout.responses)


def sequence_scores(score_model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Reward or cost of each (prompt, response) from a score model: its last-token head, ``(B,)``."""
    output = score_model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        use_cache=False,
    )
    return output.logits.squeeze(-1).float()


def token_values(critic: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """A critic's value before each response token, ``(B, R)``: the score head applied per token.

    The critic is a sequence-classification model (initialised from the reward or cost model),
    so its backbone and linear ``score`` head give a value at every position.
    """
    backbone = getattr(critic, critic.base_model_prefix)
    hidden = backbone(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        use_cache=False,
    ).last_hidden_state  # (B, P + R, H)
    values = critic.score(hidden).squeeze(-1).float()  # (B, P + R)
    return values[:, rollout.prompt_width - 1 : -1]
