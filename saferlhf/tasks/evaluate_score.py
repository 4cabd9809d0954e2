"""``saferlhf task=evaluate_score model_path=DIR``: metrics of a saved reward or cost model.

Loads the Hugging Face folder with plain ``AutoModelForSequenceClassification``, scores the
pairs of ``task.split`` it was trained for (its ``config.score_type``), and writes the same
metrics as training, under ``<split>/``, to ``summary.json`` and ``score_metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from saferlhf.data.module import PairCollator, list_loader
from saferlhf.data.sources import load_data
from saferlhf.errors import ConfigError
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import ConfigPathError
from saferlhf.tasks.score import OBJECTIVES, ScoreModule, tokenized_pairs


def evaluate_score(run: RunContext) -> TaskResult:
    cfg = run.cfg
    if not cfg.model_path or not (Path(cfg.model_path) / "config.json").is_file():
        raise ConfigPathError(
            f"model_path={cfg.model_path!r}: expected a saved reward or cost model folder "
            "(with a config.json)"
        )
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    objective = getattr(model.config, "score_type", None)
    if objective not in OBJECTIVES:
        raise ConfigError(
            f"model_path={cfg.model_path!r}: its config.json has score_type={objective!r}; "
            "expected reward or cost (a folder saved by task=reward or task=cost)"
        )
    loaded = load_data(cfg.data)
    if cfg.task.split not in loaded.splits:
        raise ConfigError(f"task.split={cfg.task.split!r}: expected one of {list(loaded.splits)}")
    pairs = tokenized_pairs(cfg, objective, loaded.splits[cfg.task.split], tokenizer)
    loader = list_loader(
        pairs, PairCollator(tokenizer.pad_token_id), cfg.task.batch_size, False, cfg.seed
    )
    scorer = ScoreModule(model, objective, lr=0.0, weight_decay=0.0, warmup_ratio=0.0, reg=0.0)
    firsts, seconds = [], []
    with torch.inference_mode():
        for batch in loader:
            first, second = scorer._pair_scores(batch)
            firsts.append(first)
            seconds.append(second)
    signs = torch.tensor(pairs.first_sign + pairs.second_sign)
    gold = torch.tensor(pairs.first_gold + pairs.second_gold)
    metrics = OBJECTIVES[objective][1](torch.cat(firsts), torch.cat(seconds), signs, gold)
    metrics = {f"{cfg.task.split}/{name}": float(value) for name, value in metrics.items()}
    run.log_metrics(metrics)
    path = run.run_dir / "score_metrics.json"
    path.write_text(
        json.dumps({"model_path": cfg.model_path, "score_type": objective, **metrics}, indent=2)
        + "\n"
    )
    return TaskResult(metrics, {"score_metrics": str(path)})
