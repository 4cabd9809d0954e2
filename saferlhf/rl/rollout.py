"""Rollouts: sample responses with the KV cache and lay them out for scoring and updates.

Layout (``Rollout``): each row is ``[left pad | prompt | response | right pad]``, with every
prompt ending at column ``prompt_width``. Response token ``t`` sits at column
``prompt_width + t`` in every row, so per-token quantities are ``(B, R)`` tensors aligned at
index 0, and the logits that predict them are columns ``prompt_width - 1 ... -2``. Explicit
``position_ids`` make left padding invisible to the models.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from saferlhf.data.collate import first_fit_rows, pad_sequences
from saferlhf.losses import chunked_token_log_probs, selective_log_softmax
from saferlhf.models import linear_lm_head, lm_head_on, score_head_at
from saferlhf.models.sharding import decoding_weights, inference_context


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

    @functools.cached_property
    def packed_layout(self) -> ModelRows:
        """The rows packed without padding (:func:`packed_rows`), laid out once per rollout
        (whose tensors nothing changes once it is made): scoring runs up to five models on
        them, each PPO minibatch's update three."""
        return packed_rows(self)

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
        logits = logits.masked_fill(~nucleus(logits.softmax(-1), top_p), float("-inf"))
    return sample_from_probs(logits.softmax(-1))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The tokens top-p sampling keeps, ``(B, V)`` bool: the most likely tokens, in order, up to
    and including the first that brings their mass to ``top_p`` (so the top token always
    stays), and any token exactly as likely as that last one.

    It needs each row's probabilities in order, not which token holds each: the sorted values
    give the least likely token kept, and one comparison with it marks the rest. On CPU that is
    0.47 ms for 64 rows of 1,024 tokens against 2.2 ms for sorting the tokens and scattering the
    decision back, whose sort took 8% of the quickstart's PPO-Lagrangian stage.
    """
    descending = _sorted_descending(probs)
    kept = (descending.cumsum(-1) - descending < top_p).sum(-1, keepdim=True)  # >= 1
    return probs >= descending.gather(-1, kept - 1)


def _sorted_descending(values: torch.Tensor) -> torch.Tensor:
    """Each row of ``values`` from largest to smallest. On CPU by numpy's vectorised sort:
    torch's sorts the indices too, and took 17 times as long for 64 rows of 1,024."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        ascending = np.sort(values.detach().numpy(), axis=-1)
        return torch.from_numpy(np.ascontiguousarray(ascending[..., ::-1]))
    return values.sort(dim=-1, descending=True).values


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
    gather_weights: bool = True,
) -> Rollout:
    """Sample one response per prompt, decoding with a KV cache until every row has ended.

    The cache is a preallocated :class:`~transformers.StaticCache` (written in place; a growing
    cache re-concatenates every layer's keys and values at each step), and one attention mask
    covers every slot (the causal mask hides the slots not yet written). The loop keeps the
    log-probability of each sampled token under the actor's raw logits (``Rollout.logprobs``).
    ``static_prompt_width`` left pads the prompts to a fixed width, so that the decoding step
    has the same shapes in every call; ``compile_decoding`` then runs it through
    ``torch.compile`` (CUDA graphs on a GPU). A sharded actor's layers are gathered once for
    all the steps (``gather_weights``), or else each layer again at every step.
    """
    # Eval mode: no dropout, and gradient checkpointing (active in train mode) drops the cache.
    was_training = actor.training
    actor.eval()
    try:
        with inference_context(actor), decoding_weights(actor, gather_all=gather_weights):
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


@dataclass
class ModelRows:
    """A rollout's rows as a model runs them, and where its per-token outputs go back to.

    Padded (:func:`padded_rows`): the rollout's own ``(B, P + R)`` rows and attention mask.
    Packed (:func:`packed_rows`): the real tokens of every row laid end to end, with no padding
    between them and no attention mask, in rows as wide as the rollout's; ``position_ids``
    restart at 0 at each rollout row, from which transformers builds a block-diagonal causal
    mask (``masking_utils.find_packed_sequence_indices`` for sdpa, eager and flex attention;
    flash attention reads the same boundaries from ``position_ids`` and runs its varlen
    kernel), so no rollout row sees another.
    """

    input_ids: torch.Tensor  # (rows, L)
    attention_mask: torch.Tensor | None  # (rows, L); None when packed
    position_ids: torch.Tensor  # (rows, L)
    # The positions whose outputs predict response tokens. Padded: (K,) columns, the same in
    # every row. Packed: (row, column) index tensors, one entry per response token of the
    # (B, R) layout's ``response_cells``, in their order.
    before_response: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    responses: torch.Tensor  # the response tokens they predict: (B, K) padded, (K,) packed
    # (B, R) cells of the response layout that packed outputs fill, in order; None: padded,
    # where the outputs are already (B, R)
    response_cells: torch.Tensor | None
    # Packed: each rollout row's last token, a flat index into (rows * L); None: padded, where
    # a score model's own pooling finds it
    ends: torch.Tensor | None

    @property
    def packed(self) -> bool:
        return self.response_cells is not None

    def model_inputs(self) -> dict[str, torch.Tensor | bool | None]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "use_cache": False,
        }

    def before_response_of(self, per_token: torch.Tensor) -> torch.Tensor:
        """``(rows, L, ...)`` outputs at the positions that predict response tokens:
        ``(B, K, ...)`` padded, ``(K, ...)`` packed."""
        if self.packed:
            return per_token[self.before_response]
        return per_token[:, self.before_response]

    def to_response_layout(self, per_token: torch.Tensor) -> torch.Tensor:
        """Outputs for ``responses`` as the ``(B, R)`` response layout, 0 where packed rows had
        no token (padding, which the losses' masks leave out)."""
        if not self.packed:
            return per_token
        return per_token.new_zeros(self.response_cells.shape).masked_scatter(
            self.response_cells, per_token
        )


def padded_rows(rollout: Rollout) -> ModelRows:
    width = rollout.input_ids.shape[1]
    before_response = torch.arange(
        rollout.prompt_width - 1, width - 1, device=rollout.input_ids.device
    )
    return ModelRows(
        rollout.input_ids, rollout.attention_mask, rollout.position_ids, before_response,
        rollout.responses, None, None,
    )  # fmt: skip


def packed_rows(rollout: Rollout) -> ModelRows:
    """The rollout's rows packed without padding (see :class:`ModelRows`): first-fit
    decreasing into rows as wide as the rollout's (:func:`~saferlhf.data.collate.
    first_fit_rows`), so every rollout row fits whole and attention costs about what it costs
    padded, while the projections and MLPs skip the padding."""
    real = rollout.attention_mask.bool()
    lengths = real.sum(-1)
    layout = first_fit_rows(lengths.tolist(), real.shape[1])
    width = max(int(lengths[members].sum()) for members in layout)
    start = torch.empty(len(lengths), dtype=torch.long)  # of each rollout row, flat, packed
    for r, members in enumerate(layout):
        offsets = lengths[members].cumsum(0) - lengths[members]
        start[members] = r * width + offsets.cpu()
    device = rollout.input_ids.device
    flat_column = start.to(device)[:, None] + real.cumsum(-1) - 1  # of each real token
    input_ids = torch.zeros(len(layout) * width, dtype=torch.long, device=device)
    input_ids[flat_column[real]] = rollout.input_ids[real]
    # Padding at a row's end numbered by its column: never one more than the token before it.
    position_ids = torch.arange(width, device=device).repeat(len(layout))
    position_ids[flat_column[real]] = rollout.position_ids[real]
    response_cells = rollout.response_mask.bool()
    # Response token t of a row sits at column prompt_width + t; the token before it predicts it.
    before_response = flat_column[:, rollout.prompt_width - 1 : -1][response_cells]
    return ModelRows(
        input_ids.view(len(layout), width), None, position_ids.view(len(layout), width),
        (before_response // width, before_response % width), rollout.responses[response_cells],
        response_cells, flat_column[:, -1],
    )  # fmt: skip


def model_rows(rollout: Rollout, packed: bool) -> ModelRows:
    return rollout.packed_layout if packed else padded_rows(rollout)


def _logits_before_response(model: PreTrainedModel, rows: ModelRows) -> torch.Tensor:
    """The logits that predict the response tokens; the LM head runs on those positions only
    (the prompt's logits would be thrown away)."""
    if rows.packed:
        with lm_head_on(model, rows.before_response):
            return model(**rows.model_inputs()).logits  # (K, V)
    return model(**rows.model_inputs(), logits_to_keep=rows.before_response).logits


def response_log_probs(
    model: PreTrainedModel, rollout: Rollout, packed: bool = False, chunk_tokens: int = 0
) -> torch.Tensor:
    """Log-probability of each sampled response token under ``model``, ``(B, R)``.

    ``packed`` runs the model on the rows packed without padding (:func:`packed_rows`).
    ``chunk_tokens > 0`` takes the final hidden states and puts them through the LM head that
    many tokens at a time (:func:`~saferlhf.losses.chunked_token_log_probs`), so the update's
    ``(tokens, V)`` logits are never all held at once, nor kept for backward.
    """
    rows = model_rows(rollout, packed)
    if chunk_tokens == 0:
        logits = _logits_before_response(model, rows).float()
        if rows.packed:  # one row of K
            return rows.to_response_layout(
                selective_log_softmax(logits[None], rows.responses[None])[0]
            )
        return selective_log_softmax(logits, rows.responses)
    head = linear_lm_head(model)
    if head is None:
        raise ValueError(
            f"chunked log-probs need an LM head that is one linear map; {type(model).__name__}'s "
            "has a bias, caps or scales its logits, or is sharded"
        )
    hidden = model.get_decoder()(**rows.model_inputs()).last_hidden_state
    logprobs = chunked_token_log_probs(
        rows.before_response_of(hidden).flatten(0, -2), head.weight, rows.responses.flatten(),
        chunk_tokens,
    ).view_as(rows.responses)  # fmt: skip
    return rows.to_response_layout(logprobs)


def sequence_scores(
    score_model: PreTrainedModel, rollout: Rollout, packed: bool = False
) -> torch.Tensor:
    """Reward or cost of each (prompt, response) from a score model: its last-token head, ``(B,)``.
    ``packed`` runs the model on the rows packed without padding (:func:`packed_rows`)."""
    rows = model_rows(rollout, packed)
    if rows.packed:
        scores = score_head_at(score_model, rows.ends, **rows.model_inputs())
    else:
        scores = score_model(**rows.model_inputs()).logits
    return scores.squeeze(-1).float()


def token_values(critic: PreTrainedModel, rollout: Rollout, packed: bool = False) -> torch.Tensor:
    """A critic's value before each response token, ``(B, R)``: the score head applied per token.

    The critic is a sequence-classification model (initialised from the reward or cost model),
    so its backbone and linear ``score`` head give a value at every position. ``packed`` runs
    the backbone on the rows packed without padding (:func:`packed_rows`).
    """
    rows = model_rows(rollout, packed)
    backbone = getattr(critic, critic.base_model_prefix)
    hidden = backbone(**rows.model_inputs()).last_hidden_state  # (rows, L, H)
    # The head on every position, then the ones wanted: a matmul over fewer rows can round
    # differently, and the padded path keeps the bits it had before packing existed.
    values = rows.before_response_of(critic.score(hidden).squeeze(-1).float())
    return rows.to_response_layout(values)
