"""Shared test helpers: a micro model config, a tokenizer trained on benchmark text, untrained
micro artifacts, a PPO run's history without its timings, and a callback that stands in for a
killed process."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from pytorch_lightning.callbacks import Callback

from saferlhf.data.benchmark import generate_benchmark
from saferlhf.data.collate import format_conversation
from saferlhf.models import (
    build_causal_lm,
    build_score_model,
    save_artifact,
    train_bpe_tokenizer,
)

# Smaller than conf/model/tiny.yaml: these models only need to run, not to learn.
MICRO_ARCH = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def micro_model_cfg() -> SimpleNamespace:
    """What saferlhf.models' builders read from ``cfg.model``, for MICRO_ARCH."""
    return SimpleNamespace(
        name="micro", name_or_path=None, dtype="float32", trust_remote_code=False, arch=MICRO_ARCH
    )


def benchmark_tokenizer(num_train: int, vocab_size: int):
    """A BPE tokenizer trained on both responses of ``num_train`` benchmark rows (seed 0)."""
    rows = generate_benchmark(
        num_train=num_train, num_test=10, seed=0, label_noise=0.0, benign_fraction=0.35
    )["train"]
    texts = [format_conversation(r["prompt"], r[f"response_{i}"]) for r in rows for i in (0, 1)]
    return train_bpe_tokenizer(texts, vocab_size=vocab_size, min_frequency=2)


def save_micro_artifacts(root: Path) -> Path:
    """Untrained micro policy, reward and cost folders under ``root``, as earlier stages would
    write them (seed 0)."""
    tokenizer = benchmark_tokenizer(num_train=200, vocab_size=512)
    torch.manual_seed(0)
    save_artifact(build_causal_lm(micro_model_cfg(), tokenizer), tokenizer, root / "policy")
    for name in ("reward", "cost"):
        save_artifact(build_score_model(micro_model_cfg(), tokenizer), tokenizer, root / name)
    return root


class Interrupt(Exception):
    pass


class InterruptAt(Callback):
    """Stands in for a killed process: raises before training batch ``batch_idx`` of the
    first epoch, or once ``trainer.global_step`` reaches ``global_step``."""

    def __init__(self, *, batch_idx: int | None = None, global_step: int | None = None):
        self.batch_idx, self.global_step = batch_idx, global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx or trainer.global_step == self.global_step:
            raise Interrupt


def ppo_history(run_dir: Path) -> list[dict[str, float]]:
    """A PPO run's ``ppo_history.json`` without its ``time/*`` entries, which no two runs share."""
    history = json.loads((run_dir / "ppo_history.json").read_text())
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]
