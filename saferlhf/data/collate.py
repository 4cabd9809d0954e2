"""The conversation template, tokenization, truncation and padding.

Two templates (``model.prompt_template``): Safe RLHF's, ``BEGINNING OF CONVERSATION: USER:
{prompt} ASSISTANT:``, then the response, then EOS; or the tokenizer's own chat template (one
user turn, the generation prompt, the response, then its end-of-turn token, which
:func:`saferlhf.models.load_tokenizer` makes the tokenizer's EOS). The tokenizer says which:
a tokenizer with a chat template uses it (``prompt_template=safe_rlhf`` drops it on load).
Every stage formats text here so prompts look the same to every model.

A conversation longer than ``max_length`` never loses its response to its prompt. The
template's fixed parts (its head before the prompt and its marker between prompt and
response, e.g. ``ASSISTANT:``) always stay and the prompt gives way first, from its start, so
the words next to the response stay. What happens to a response that does not fit even alone
depends on who reads it (:func:`keep_response_end`, :func:`keep_response_start`,
:func:`response_windows`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from saferlhf.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Template:
    """``head + prompt_prefix + prompt + marker`` is the prompt a model answers; its response
    follows after ``response_prefix``, then EOS."""

    name: str  # safe_rlhf | chat
    head: str
    marker: str
    prompt_prefix: str = ""
    response_prefix: str = ""

    def prompt(self, prompt: str) -> str:
        return f"{self.head}{self.prompt_prefix}{prompt}{self.marker}"

    def conversation(self, prompt: str, response: str) -> str:
        return f"{self.prompt(prompt)}{self.response_prefix}{response}"


SAFE_RLHF = Template("safe_rlhf", "BEGINNING OF CONVERSATION: USER:", " ASSISTANT:", " ", " ")
_PLACEHOLDER = "SAFERLHFPLACEHOLDER"  # one word: chat templates may trim what they are given


def template_of(tokenizer: PreTrainedTokenizerBase) -> Template:
    """The tokenizer's chat template with one user turn and the generation prompt, split
    around the prompt; Safe RLHF's when the tokenizer has none."""
    if not tokenizer.chat_template:
        return SAFE_RLHF
    user = [{"role": "user", "content": _PLACEHOLDER}]
    rendered = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    head, found, marker = rendered.partition(_PLACEHOLDER)
    if not found or _PLACEHOLDER in marker:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r}: its chat template does not show a user "
            "message once, so model.prompt_template=chat cannot use it"
        )
    return Template("chat", head, marker)


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``): what a chat model stops at."""
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": _PLACEHOLDER},
    ]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    after = rendered.rpartition(_PLACEHOLDER)[2]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    token = tokenizer.convert_ids_to_tokens(ids[0]) if ids else None
    if token not in tokenizer.all_special_tokens:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r}: its chat template ends an assistant turn "
            f"with {after!r}, not with a special token, so model.prompt_template=chat cannot "
            "tell where an answer ends"
        )
    return token


def format_conversation(prompt: str, response: str, template: Template = SAFE_RLHF) -> str:
    return template.conversation(prompt, response)


# -- what to keep: token counts in, token counts out -------------------------------------------


class Window(NamedTuple):
    """What a model sees of one conversation: the template, the last ``prompt_tokens`` tokens of
    the prompt, response tokens ``[response_start, response_stop)`` and EOS when ``eos``."""

    prompt_tokens: int
    response_start: int
    response_stop: int
    eos: bool

    def cuts(self, prompt: int, response: int) -> bool:
        """Whether this window leaves out any of a ``prompt``- and ``response``-token conversation."""
        return self != Window(prompt, 0, response, True)


def _room(fixed: int, max_length: int) -> int:
    """Tokens left for the prompt and response once the template's ``fixed`` tokens and EOS are in."""
    room = max_length - fixed - 1
    if room < 1:
        raise ConfigError(
            f"max_length={max_length} tokens cannot hold the conversation template ({fixed} "
            "tokens), one response token and EOS: raise model.max_length"
        )
    return room


def keep_response_end(fixed: int, prompt: int, response: int, max_length: int) -> Window:
    """For score models (reward, cost, moderation training), which read the last token: the
    response's end and EOS always stay; the prompt gives way first, from its start, then the
    response's start. ``fixed``, ``prompt`` and ``response`` are token counts."""
    room = _room(fixed, max_length)
    kept = min(response, room)
    return Window(min(prompt, room - kept), response - kept, response, True)


def keep_response_start(fixed: int, prompt: int, response: int, max_length: int) -> Window:
    """For language modelling (SFT, DPO, ptx), where the response tokens carry the loss: the
    prompt gives way first, from its start. A response that does not fit alone keeps its
    beginning, as generation produces it, and no EOS: it did not end there."""
    room = _room(fixed, max_length)
    if response <= room:
        return Window(min(prompt, room - response), 0, response, True)
    return Window(0, 0, room + 1, False)  # EOS's place goes to one more response token


def response_windows(fixed: int, prompt: int, response: int, max_length: int) -> list[Window]:
    """For judging harm: the views of a conversation a moderator judges, the worst one counting,
    so that no part of the response escapes and no prompt talks the moderator out of it.

    - The whole conversation when it fits: one view.
    - A response that fits beside the template and EOS, but not with the whole prompt: the
      prompt's end and the response, and the response alone. A cut prompt is not the prompt
      the model was trained to read, and a long benign stretch of it dilutes the response's
      harm, so the response is judged without it too.
    - A longer response: windows over the response alone, each as long as fits, half a window
      apart, the last ending at the response's end. Every token is seen, and any run of up to
      half a window of response tokens lies whole in one window.
    """
    room = _room(fixed, max_length)
    if prompt + response <= room:
        return [Window(prompt, 0, response, True)]
    if response <= room:
        alone = Window(0, 0, response, True)
        kept = room - response
        return [Window(kept, 0, response, True), alone] if kept else [alone]
    stride = max(1, room // 2)
    starts = [*range(0, response - room, stride), response - room]
    return [Window(0, start, start + room, True) for start in starts]


def keep_prompt_end(fixed: int, prompt: int, max_length: int) -> int:
    """Prompt tokens kept for generation, where the template's ``fixed`` tokens (head and the
    ``ASSISTANT:`` cue) always stay: the prompt's end, next to the cue."""
    if max_length - fixed < 1:
        raise ConfigError(
            f"a prompt length of {max_length} tokens (model.max_length - max_new_tokens) cannot "
            f"hold the prompt template ({fixed} tokens) and one prompt token"
        )
    return min(prompt, max_length - fixed)


# -- tokens ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segments:
    """A templated conversation's token ids in its four parts, in order."""

    head: list[int]  # e.g. BEGINNING OF CONVERSATION: USER:
    prompt: list[int]
    marker: list[int]  # e.g. ASSISTANT:
    response: list[int]  # empty for a prompt alone

    @property
    def fixed(self) -> int:
        return len(self.head) + len(self.marker)

    def join(self, window: Window, eos_token_id: int) -> list[int]:
        prompt = self.prompt[len(self.prompt) - window.prompt_tokens :]
        response = self.response[window.response_start : window.response_stop]
        ids = [*self.head, *prompt, *self.marker, *response]
        return [*ids, eos_token_id] if window.eos else ids


def _part(start: int, stop: int, head_stop: int, marker_start: int, marker_stop: int) -> int:
    """0 head, 1 prompt, 2 marker, 3 response: the part of a token spanning ``[start, stop)``
    characters. A token that touches the head or the marker belongs to it."""
    if start < head_stop:
        return 0
    if stop <= marker_start:
        return 1
    return 2 if start < marker_stop else 3


def segment(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str] | None
) -> list[Segments]:
    """Tokenize each templated conversation (or prompt alone, when ``responses`` is None) as one
    text, so that the ids are exactly the untruncated ones, then split them at the template's
    boundaries by their character offsets; cutting the prompt never cuts the template."""
    if not tokenizer.is_fast:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} is a slow (Python) tokenizer: fitting "
            "conversations to max_length needs a fast one's token offsets (a tokenizer.json)"
        )
    template = template_of(tokenizer)
    if responses is None:
        texts = [template.prompt(p) for p in prompts]
    else:
        texts = [template.conversation(p, r) for p, r in zip(prompts, responses, strict=True)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    head_stop = len(template.head)
    segments = []
    for prompt, ids, offsets in zip(
        prompts, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        marker_start = head_stop + len(template.prompt_prefix) + len(prompt)
        marker_stop = marker_start + len(template.marker)
        parts = [_part(a, b, head_stop, marker_start, marker_stop) for a, b in offsets]
        # Offsets only grow, so each part is one run of tokens.
        head = parts.count(0)
        prompt_stop = head + parts.count(1)
        marker_stop = prompt_stop + parts.count(2)
        segments.append(
            Segments(
                ids[:head], ids[head:prompt_stop], ids[prompt_stop:marker_stop], ids[marker_stop:]
            )
        )
    return segments


@dataclass(frozen=True)
class Encoded(Generic[T]):
    """One encoding per conversation, and which conversations lost tokens to ``max_length``."""

    examples: list[T]
    truncated: list[bool]

    @property
    def num_truncated(self) -> int:
        return sum(self.truncated)


def log_truncated(truncated: int, total: int, what: str, max_length: int) -> None:
    """Say how many of ``total`` ``what`` (e.g. "train conversations") did not fit."""
    if truncated:
        log.warning(
            "%d of %d %s longer than max_length=%d tokens: truncated, the prompt first (from its "
            "start), never the template",
            truncated,
            total,
            what,
            max_length,
        )


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    fit: Callable[[int, int, int, int], Window],
) -> tuple[list[Segments], list[Window]]:
    """Each conversation's segments and the window ``fit`` keeps of it."""
    segments = segment(tokenizer, prompts, responses)
    windows = [fit(s.fixed, len(s.prompt), len(s.response), max_length) for s in segments]
    return segments, windows


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> Encoded[list[int]]:
    """Token ids of each templated conversation, ending in EOS and at most ``max_length`` long,
    cut as :func:`keep_response_end` says (score models read the last token)."""
    segments, windows = _encode(tokenizer, prompts, responses, max_length, keep_response_end)
    eos = tokenizer.eos_token_id
    return Encoded(
        [s.join(w, eos) for s, w in zip(segments, windows, strict=True)],
        [w.cuts(len(s.prompt), len(s.response)) for s, w in zip(segments, windows, strict=True)],
    )


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> list[list[int]]:
    """:func:`encode_conversations`' ids alone."""
    return encode_conversations(tokenizer, prompts, responses, max_length).examples


def encode_windows(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> Encoded[list[list[int]]]:
    """Per conversation, the sequences a moderator judges, the worst one counting
    (:func:`response_windows`): the conversation when it fits; else the prompt's end with the
    response and the response alone; overlapping windows for a response too long for one."""
    segments = segment(tokenizer, prompts, responses)
    eos = tokenizer.eos_token_id
    examples, truncated = [], []
    for s in segments:
        windows = response_windows(s.fixed, len(s.prompt), len(s.response), max_length)
        examples.append([s.join(w, eos) for w in windows])
        truncated.append(len(windows) > 1 or windows[0].cuts(len(s.prompt), len(s.response)))
    return Encoded(examples, truncated)


def encode_sft_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> Encoded[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per conversation, labels -100 on the template and prompt: the
    model learns the response and its EOS only. Cut as :func:`keep_response_start` says."""
    segments, windows = _encode(tokenizer, prompts, responses, max_length, keep_response_start)
    eos = tokenizer.eos_token_id
    examples, truncated = [], []
    for s, w in zip(segments, windows, strict=True):
        ids = s.join(w, eos)
        prompt_part = s.fixed + w.prompt_tokens
        examples.append((ids, [-100] * prompt_part + ids[prompt_part:]))
        truncated.append(w.cuts(len(s.prompt), len(s.response)))
    return Encoded(examples, truncated)


def tokenize_sft_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_sft_examples`' examples alone."""
    return encode_sft_examples(tokenizer, prompts, responses, max_length).examples


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int
) -> Encoded[list[int]]:
    """Templated prompt ids for generation, at most ``max_length`` long: the head and the
    ``ASSISTANT:`` cue always stay, a long prompt keeps its end (:func:`keep_prompt_end`)."""
    examples, truncated = [], []
    for s in segment(tokenizer, prompts, None):
        kept = keep_prompt_end(s.fixed, len(s.prompt), max_length)
        examples.append(s.join(Window(kept, 0, 0, False), tokenizer.eos_token_id))
        truncated.append(kept < len(s.prompt))
    return Encoded(examples, truncated)


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int
) -> list[list[int]]:
    """:func:`encode_prompts`' ids alone."""
    return encode_prompts(tokenizer, prompts, max_length).examples


# -- batches ------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Packed:
    """Sequences laid end to end in rows of at most ``capacity`` tokens, with no padding
    between them: ``position_ids`` restart at 0 at each sequence, which is how transformers'
    attention (its sdpa, eager and flex masks; flash attention's varlen kernel) keeps the
    sequences of a row apart. A row's unused end is padding whose positions count from 0 again,
    a sequence of its own that nothing reads."""

    input_ids: torch.Tensor  # (rows, width)
    position_ids: torch.Tensor  # (rows, width)
    ends: torch.Tensor  # (sequences,) flat index into (rows * width) of each one's last token
    labels: torch.Tensor | None  # (rows, width), -100 at each sequence's first token and padding


def first_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The indices of the sequences each row holds: longest first, each into the first row
    with room for it (first-fit decreasing), rows of at most ``capacity`` tokens."""
    if max(lengths) > capacity:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(capacity)
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def pack_sequences(
    sequences: Sequence[Sequence[int]],
    capacity: int,
    pad_token_id: int,
    labels: Sequence[Sequence[int]] | None = None,
) -> Packed:
    """Pack ``sequences`` (each at most ``capacity`` tokens) longest first, each into the first
    row with room (first-fit decreasing), keeping ``labels`` in the same layout.

    A sequence's first label becomes -100: nothing in the sequence predicts its first token,
    and in a packed row the token before it is the previous sequence's last.
    """
    lengths = [len(s) for s in sequences]
    rows = first_fit_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in members) for members in rows)
    # Built as flat lists, each made a tensor once: a batch holds 64-128 sequences.
    ids: list[int] = []
    positions: list[int] = []
    packed_labels: list[int] = []
    ends = [0] * len(sequences)
    for members in rows:
        for index in members:
            ids += sequences[index]
            positions += range(lengths[index])
            packed_labels += [-100, *labels[index][1:]] if labels is not None else []
            ends[index] = len(ids) - 1
        pad = -len(ids) % width  # to the row's end
        ids += [pad_token_id] * pad
        positions += range(pad)
        packed_labels += [-100] * pad if labels is not None else []
    shape = (len(rows), width)
    return Packed(
        _long_tensor(ids).view(shape),
        _long_tensor(positions).view(shape),
        _long_tensor(ends),
        _long_tensor(packed_labels).view(shape) if labels is not None else None,
    )


def sequence_layout(
    sequences: Sequence[Sequence[int]], pad_token_id: int, pack_length: int | None
) -> dict[str, torch.Tensor]:
    """A model's inputs for ``sequences`` of which one output each is read: right-padded rows
    (``input_ids``, ``attention_mask``), or with ``pack_length`` rows of that many tokens
    (``input_ids``, ``position_ids``, and ``ends``, where each sequence ends)."""
    if pack_length is None:
        input_ids, attention_mask = pad_sequences(sequences, pad_token_id, side="right")
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    packed = pack_sequences(sequences, pack_length, pad_token_id)
    return {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "ends": packed.ends}


def _long_tensor(values: list[int]) -> torch.Tensor:
    # Through numpy: torch.tensor reads a list of ints four times slower.
    return torch.from_numpy(np.array(values, dtype=np.int64))
