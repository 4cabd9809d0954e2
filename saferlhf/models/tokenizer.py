"""Tokenizers: a hub/local one by ``name_or_path``, or a byte-level BPE trained on the data."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from saferlhf.data.collate import end_of_turn
from saferlhf.errors import ConfigError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) with distinct pad, bos and eos tokens.

    Byte-level means any text round-trips, including what a policy generates; pad differs from
    eos so that a generated end of sequence is never mistaken for padding.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, prompt_template: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a hub id or a local folder (one code path), with a pad token ≠ eos.

    ``prompt_template`` (``model.prompt_template``): ``chat`` keeps the tokenizer's chat
    template and makes the token that ends an assistant turn its EOS, the token generation
    stops at and training appends; ``safe_rlhf`` drops any chat template, so that Safe RLHF's is
    used and saved artifacts carry none; None follows the folder (chat when it has one)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if prompt_template is None:
        prompt_template = "chat" if tokenizer.chat_template else "safe_rlhf"
    if prompt_template == "chat":
        if not tokenizer.chat_template:
            raise ConfigError(
                f"model.prompt_template=chat: the tokenizer of {name_or_path!r} has no chat "
                "template (use model.prompt_template=safe_rlhf)"
            )
        tokenizer.eos_token = end_of_turn(tokenizer)
    else:
        tokenizer.chat_template = None
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Many base models ship without a pad token; reusing eos would mask real ends of text.
        tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


def build_tokenizer(model_cfg: Any, texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """The tokenizer for ``cfg.model``: loaded by name, or trained on ``texts`` from scratch."""
    if model_cfg.name_or_path:
        _check_artifact_template(model_cfg.name_or_path, model_cfg.prompt_template)
        return load_tokenizer(
            model_cfg.name_or_path, model_cfg.trust_remote_code, model_cfg.prompt_template
        )
    if model_cfg.tokenizer is None:
        raise ConfigError(
            f"model.tokenizer is required when model.name_or_path is unset (model={model_cfg.name})"
        )
    return train_bpe_tokenizer(
        texts, model_cfg.tokenizer.vocab_size, model_cfg.tokenizer.min_frequency
    )


# The key in a saved artifact's config.json that names the template it was trained with.
TEMPLATE_KEY = "saferlhf_prompt_template"


def _check_artifact_template(name_or_path: str, prompt_template: str) -> None:
    """A model this project saved goes on with the template it was trained with."""
    config = Path(name_or_path) / "config.json"
    if not config.is_file():
        return
    trained_with = json.loads(config.read_text()).get(TEMPLATE_KEY)
    if trained_with is not None and trained_with != prompt_template:
        raise ConfigError(
            f"model.prompt_template={prompt_template}: {name_or_path} was trained with "
            f"model.prompt_template={trained_with}; set model.prompt_template={trained_with}"
        )
