from saferlhf.models.builders import (
    build_causal_lm,
    build_score_model,
    count_parameters,
    linear_lm_head,
    lm_head_on,
    save_artifact,
    score_head_at,
)
from saferlhf.models.tokenizer import build_tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "build_causal_lm",
    "build_score_model",
    "build_tokenizer",
    "count_parameters",
    "linear_lm_head",
    "lm_head_on",
    "load_tokenizer",
    "save_artifact",
    "score_head_at",
    "train_bpe_tokenizer",
]
