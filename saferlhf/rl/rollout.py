"""Rollouts: sample responses with the KV cache and lay them out for scoring and updates.

Layout (``Rollout``): each row is ``[left pad | prompt | response | right pad]``, with every
prompt ending at column ``prompt_width``. Response token ``t`` sits at column
``prompt_width + t`` in every row, so per-token quantities are ``(B, R)`` tensors aligned at
index 0, and the logits that predict them are columns ``prompt_width - 1 ... -2``. Explicit
``position_ids`` make left padding invisible to the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from saferlhf.data.collate import pad_sequences
from saferlhf.losses import selective_log_softmax


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R), 1.0 up to and including EOS
    prompt_width: int  # P

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
        )


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only attended tokens, so left padding does not shift positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_mask_until_eos(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on every token up to and including the first EOS of each row, 0 after it."""
    is_eos = (responses == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before this position
    return (eos_before == 0).float()


@torch.no_grad()
def sample_responses(
    actor: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> Rollout:
    """Sample one response per prompt with ``generate`` (KV cache; stops when all rows ended)."""
    device = actor.device
    prompts, prompt_mask = pad_sequences(prompt_ids, tokenizer.pad_token_id, side="left")
    prompts, prompt_mask = prompts.to(device), prompt_mask.to(device)
    output = actor.generate(
        input_ids=prompts,
        attention_mask=prompt_mask,
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    width = prompts.shape[1]
    responses = output[:, width:]
    response_mask = response_mask_until_eos(responses, tokenizer.eos_token_id)
    responses = responses.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    input_ids = torch.cat([prompts, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return Rollout(
        input_ids, attention_mask, positions_from_mask(attention_mask), response_mask, width
    )


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    return tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)


def response_logits(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Logits predicting each response token, ``(B, R, V)``."""
    logits = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
    ).logits
    return logits[:, rollout.prompt_width - 1 : -1]


def response_log_probs(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Log-probability of each sampled response token under ``model``, ``(B, R)``."""
    return selective_log_softmax(response_logits(model, rollout).float(), rollout.responses)


def sequence_scores(score_model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Reward or cost of each (prompt, response) from a score model: its last-token head, ``(B,)``."""
    output = score_model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
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
    ).last_hidden_state  # (B, P + R, H)
    values = critic.score(hidden).squeeze(-1).float()  # (B, P + R)
    return values[:, rollout.prompt_width - 1 : -1]
