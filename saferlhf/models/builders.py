"""Model builders: policies are ``AutoModelForCausalLM``, score models
``AutoModelForSequenceClassification`` (one label: the reward or cost at the last token).

A from-scratch model is built from ``cfg.model.arch``; a named one is loaded by
``name_or_path``, a hub id or a local folder through the same ``from_pretrained`` call.
Artifacts are plain Hugging Face folders: config, safetensors weights and the tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from saferlhf.data.collate import template_of
from saferlhf.models.sharding import is_sharded
from saferlhf.models.tokenizer import TEMPLATE_KEY

# Config fields of architectures whose logits are not the LM head's output alone (Gemma 2 and 3,
# Cohere, Granite): their forward caps or scales the logits after the head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _arch_config(model_cfg: Any, tokenizer: PreTrainedTokenizerBase, **extra: Any):
    arch = dict(model_cfg.arch)
    model_type = arch.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **arch,
        **extra,
    )


def _dtype(model_cfg: Any) -> torch.dtype:
    return getattr(torch, model_cfg.dtype)


def _match_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Grow the embeddings if the tokenizer gained tokens (a pad token) and record pad and EOS
    (a chat template's end-of-turn token), so that plain ``generate`` stops where we do."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:  # score models have none
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_causal_lm(model_cfg: Any, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A policy for ``cfg.model``: loaded from ``name_or_path`` or initialised from ``arch``."""
    if model_cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.name_or_path,
            dtype=_dtype(model_cfg),
            trust_remote_code=model_cfg.trust_remote_code,
        )
    else:
        model = AutoModelForCausalLM.from_config(
            _arch_config(model_cfg, tokenizer), dtype=_dtype(model_cfg)
        )
    return _match_tokenizer(model, tokenizer)


def build_score_model(
    model_cfg: Any, tokenizer: PreTrainedTokenizerBase, num_labels: int = 1
) -> PreTrainedModel:
    """A score model (reward or cost): the backbone with a linear head on the last non-pad token."""
    if model_cfg.name_or_path:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_cfg.name_or_path,
            num_labels=num_labels,
            dtype=_dtype(model_cfg),
            trust_remote_code=model_cfg.trust_remote_code,
        )
    else:
        config = _arch_config(model_cfg, tokenizer, num_labels=num_labels)
        model = AutoModelForSequenceClassification.from_config(config, dtype=_dtype(model_cfg))
    return _match_tokenizer(model, tokenizer)


def linear_lm_head(model: PreTrainedModel) -> torch.nn.Linear | None:
    """The causal LM's head when its logits are exactly ``final hidden states @ Wᵀ`` and the
    head can run apart from the model's own forward, so that callers can put only the hidden
    states they need through it; None otherwise (a bias, capped or scaled logits, or weights
    sharded by FSDP, which gathers them only inside the model's forward)."""
    head = model.get_output_embeddings()
    if (
        type(head) is not torch.nn.Linear
        or head.bias is not None
        or any(getattr(model.config, field, None) for field in _LOGIT_TRANSFORMS)
        or is_sharded(model)
    ):
        return None
    return head


@contextlib.contextmanager
def lm_head_on(
    model: PreTrainedModel, positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
) -> Iterator[None]:
    """Within the block, ``model``'s LM head takes the final hidden states at ``positions``
    only, so the model's ``logits`` are ``(N, V)`` for the ``N`` positions: a ``(B, T)`` bool
    mask (positions in row order), or ``(rows, columns)`` index tensors (in their order).

    A forward pre-hook picks the rows inside the model's own forward, so whatever the forward
    does around the head still happens: FSDP gathers the head's weights, and architectures
    that cap or scale the logits (Gemma, Cohere) still do, position by position.
    """
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda head, args: (args[0][positions], *args[1:])
    )
    try:
        yield
    finally:
        handle.remove()


def score_head_at(
    model: PreTrainedModel, flat_positions: torch.Tensor, **inputs: torch.Tensor | bool | None
) -> torch.Tensor:
    """A sequence-classification model run on ``inputs`` (``(rows, L)``), and its head's
    output at ``flat_positions``, indices into the ``rows * L`` positions: ``(N, num_labels)``.

    The model's own pooling reads one last non-pad token per row, which is wrong for packed
    rows (several sequences to a row), so a forward hook on ``score`` keeps the head's output
    at every position instead. The model runs whole, so FSDP still gathers the head's weights.
    """
    per_token = []
    handle = model.score.register_forward_hook(lambda head, args, out: per_token.append(out))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return per_token[0].flatten(0, 1)[flat_positions]


def save_artifact(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) that any HF client loads;
    its config.json names the prompt template it was trained with."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    setattr(model.config, TEMPLATE_KEY, template_of(tokenizer).name)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
