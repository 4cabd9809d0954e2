"""The conversation template, tokenization and padding.

Safe RLHF's template: ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:``, then the
response, then EOS. Every stage formats text here so prompts look the same to every model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def format_conversation(prompt: str, response: str) -> str:
    return f"{format_prompt(prompt)} {response}"


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> list[list[int]]:
    """Token ids of each templated conversation, ending in EOS and at most ``max_length`` long.

    A too-long conversation loses the end of its response, never its EOS: score models read
    the last token.
    """
    texts = [format_conversation(p, r) for p, r in zip(prompts, responses, strict=True)]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids[: max_length - 1] + [tokenizer.eos_token_id] for ids in encoded]


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    side: str = "right",
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to ``width`` (default: the longest sequence): ``(input_ids, attention_mask)``, each
    ``(batch, width)``."""
    longest = max(len(s) for s in sequences)
    if width is None:
        width = longest
    elif width < longest:
        raise ValueError(f"a sequence of {longest} tokens does not fit the padded width {width}")
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        input_ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def tokenize_sft_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per conversation, labels -100 on the prompt: the model learns
    the response and its EOS only."""
    prompt_ids = tokenizer([format_prompt(p) for p in prompts], add_special_tokens=False)[
        "input_ids"
    ]
    full_ids = tokenize_conversations(tokenizer, prompts, responses, max_length)
    examples = []
    for prompt, ids in zip(prompt_ids, full_ids, strict=True):
        # BPE may merge across the prompt/response boundary; the template ends in ":" then a
        # space-prefixed response, so the prompt's tokens are a prefix of the conversation's.
        prefix = min(len(prompt), len(ids) - 1)
        examples.append((ids, [-100] * prefix + ids[prefix:]))
    return examples


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int
) -> list[list[int]]:
    """Templated prompt ids for generation, keeping the end (the ``ASSISTANT:`` cue) if too long."""
    encoded = tokenizer([format_prompt(p) for p in prompts], add_special_tokens=False)["input_ids"]
    return [ids[-max_length:] for ids in encoded]
