"""``saferlhf task=reward`` and ``task=cost``: score models as Lightning modules.

The reward model learns ``better_response_id`` (or the single-preference label) with the
Bradley-Terry loss; the cost model learns ``safer_response_id`` plus the safe/unsafe sign of
each response (Safe RLHF, arXiv 2310.12773, section 3.2). Both validate on the test split every
epoch, keep the best checkpoint by ``task.monitor``, and export it as a Hugging Face
``AutoModelForSequenceClassification`` folder: ``artifacts/reward`` or ``artifacts/cost``.
The score is read at the last token, so a conversation longer than ``model.max_length`` keeps
its response's end and loses the start of its prompt first
(:func:`saferlhf.data.collate.keep_response_end`); ``train/truncated`` and ``val/truncated``
count the conversations cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from saferlhf.data import views
from saferlhf.data.augment import corrupted_pairs
from saferlhf.data.collate import encode_conversations, log_truncated
from saferlhf.data.module import ListDataModule, PairCollator, TokenizedPairs
from saferlhf.data.sources import load_data
from saferlhf.errors import ConfigError
from saferlhf.evaluate.metrics import pairwise_accuracy, sign_accuracy, spearman
from saferlhf.losses import bradley_terry_loss, cost_loss
from saferlhf.models import build_score_model
from saferlhf.models.sharding import shard_for_strategy
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import (
    adamw_with_schedule,
    export_artifact,
    fit_and_validate_best,
    gather_across_ranks,
    gold_scores,
    last_token_logits,
    model_config,
    pack_length,
    tokenizer_for,
)

# -- objectives: (first scores, second scores, signs (2B,), reg) -> loss ----------------------


def reward_objective(
    better: torch.Tensor, worse: torch.Tensor, signs: torch.Tensor, reg: float
) -> torch.Tensor:
    return bradley_terry_loss(better, worse, reg)


def cost_objective(
    safer: torch.Tensor, unsafer: torch.Tensor, signs: torch.Tensor, reg: float
) -> torch.Tensor:
    safer_signs, unsafer_signs = signs.chunk(2)
    return cost_loss(safer, unsafer, safer_signs, unsafer_signs, reg)


def reward_metrics(better, worse, signs, gold) -> dict[str, torch.Tensor]:
    scores = torch.cat([better, worse])
    metrics = {
        "accuracy": pairwise_accuracy(better, worse),
        "score_mean": scores.mean(),
        "score_std": scores.std(),
    }
    return metrics | _gold_metric(scores, gold)


def cost_metrics(safer, unsafer, signs, gold) -> dict[str, torch.Tensor]:
    costs = torch.cat([safer, unsafer])
    metrics = {
        "accuracy": pairwise_accuracy(unsafer, safer),  # the unsafer response costs more
        "sign_accuracy": sign_accuracy(costs, signs),
        "score_mean": costs.mean(),
        "score_std": costs.std(),
    }
    return metrics | _gold_metric(costs, gold)


def _gold_metric(scores: torch.Tensor, gold: torch.Tensor) -> dict[str, torch.Tensor]:
    known = ~gold.isnan()
    return {"gold_spearman": spearman(scores[known], gold[known])} if known.any() else {}


OBJECTIVES: dict[str, tuple[Callable, Callable]] = {
    "reward": (reward_objective, reward_metrics),
    "cost": (cost_objective, cost_metrics),
}
GOLD_FIELD = {"reward": "helpfulness", "cost": "severity"}


class ScoreModule(pl.LightningModule):
    """A score model (one scalar at the last non-pad token) trained on pairs of responses."""

    def __init__(
        self,
        model: PreTrainedModel,
        objective: str,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
        reg: float,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model.train()  # from_pretrained returns eval mode: dropout would stay off
        self.loss_fn, self.metrics_fn = OBJECTIVES[objective]
        self._val_batches: list[dict[str, torch.Tensor]] = []

    def configure_model(self) -> None:
        shard_for_strategy(self, [self.model])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The score of each sequence of a :class:`~saferlhf.data.module.PairCollator` batch,
        padded or packed, ``(N,)``."""
        return last_token_logits(self.model, batch).squeeze(-1)

    def _pair_scores(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch).float().chunk(2)  # (B,), (B,)

    def training_step(self, batch, batch_idx):
        first, second = self._pair_scores(batch)
        real = batch["weight"] > 0  # ShardedSampler's padding slots carry weight 0
        if not real.any():
            return first.sum() * 0.0  # keep every rank's backward in step under DDP
        signs = torch.cat([s[real] for s in batch["signs"].chunk(2)])
        loss = self.loss_fn(first[real], second[real], signs, self.hparams.reg)
        self.log("train/loss", loss, prog_bar=True)
        # Summed over steps and ranks: the pairs trained on this epoch (each exactly once).
        self.log(
            "train/epoch_pairs",
            real.sum().float(),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            sync_dist=True,
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_batches = []

    def validation_step(self, batch, batch_idx):
        first, second = self._pair_scores(batch)
        per_pair = lambda t: torch.stack(t.chunk(2), dim=1)  # (2B,) -> (B, 2)  # noqa: E731
        self._val_batches.append(
            {
                "first": first,
                "second": second,
                "signs": per_pair(batch["signs"]),
                "gold": per_pair(batch["gold"]),
                "weight": batch["weight"],
            }
        )

    def _gathered(self, key: str) -> torch.Tensor:
        return gather_across_ranks(self, self._val_batches, key)

    def on_validation_epoch_end(self) -> None:
        real = self._gathered("weight") > 0
        first, second = self._gathered("first")[real], self._gathered("second")[real]
        signs, gold = self._gathered("signs")[real], self._gathered("gold")[real]  # (n, 2)
        metrics = self.metrics_fn(first, second, signs.T.reshape(-1), gold.T.reshape(-1))
        # Every rank holds the same gathered values: the sync averages identical numbers.
        self.log_dict(
            {f"val/{name}": value.float() for name, value in metrics.items()}, sync_dist=True
        )

    def configure_optimizers(self):
        h = self.hparams
        steps_per_epoch = len(self.trainer.datamodule.train_dataloader())
        return adamw_with_schedule(
            self, self.model.parameters(), h.lr, h.weight_decay, h.warmup_ratio, steps_per_epoch
        )


def encode_pairs(
    cfg: DictConfig,
    objective: str,
    rows,
    tokenizer,
    corrupted_fraction: float = 0.0,
    with_gold: bool = True,
) -> tuple[TokenizedPairs, int]:
    """Tokenize the view a stage learns from: preference pairs (reward), plus pairs that rank a
    response above a corrupted copy of itself (``corrupted_fraction`` of their number), or
    safety pairs (cost). Also returns how many conversations (two per pair) were truncated.
    ``with_gold`` scores each response with the oracle for the validation metrics (NaN
    otherwise: training reads no gold)."""
    max_length = cfg.model.max_length
    if objective == "reward":
        pairs = views.preference_pairs(rows)
        pairs += corrupted_pairs(pairs, corrupted_fraction, cfg.seed)
        firsts, seconds = [p.chosen for p in pairs], [p.rejected for p in pairs]
        first_sign = second_sign = [math.nan] * len(pairs)
    else:
        pairs = views.safety_pairs(rows)
        firsts, seconds = [p.safer for p in pairs], [p.unsafer for p in pairs]
        first_sign, second_sign = (
            [float(p.safer_sign) for p in pairs],
            [float(p.unsafer_sign) for p in pairs],
        )
    prompts = [p.prompt for p in pairs]
    first = encode_conversations(tokenizer, prompts, firsts, max_length)
    second = encode_conversations(tokenizer, prompts, seconds, max_length)
    field = GOLD_FIELD[objective]

    def gold(responses: list[str]) -> list[float]:
        if not with_gold:
            return [math.nan] * len(responses)
        return gold_scores(cfg.data, prompts, responses, field)

    tokenized = TokenizedPairs(
        first=first.examples,
        second=second.examples,
        first_sign=first_sign,
        second_sign=second_sign,
        first_gold=gold(firsts),
        second_gold=gold(seconds),
    )
    return tokenized, first.num_truncated + second.num_truncated


def tokenized_pairs(
    cfg: DictConfig, objective: str, rows, tokenizer, corrupted_fraction: float = 0.0
) -> TokenizedPairs:
    """:func:`encode_pairs`' pairs alone."""
    return encode_pairs(cfg, objective, rows, tokenizer, corrupted_fraction)[0]


def score_task(run: RunContext) -> TaskResult:
    cfg, task, objective = run.cfg, run.cfg.task, run.cfg.task.name
    if objective == "cost" and not cfg.preference.use_cost:
        raise ConfigError(
            "task=cost needs dual-preference data (safer_response_id); got "
            f"preference={cfg.preference.name}"
        )
    if objective == "cost" and task.corrupted_pairs > 0:
        raise ConfigError(
            f"task.corrupted_pairs={task.corrupted_pairs} is for reward models: a corrupted copy "
            "of an unsafe answer may or may not still be unsafe, so it has no cost label"
        )
    loaded = load_data(cfg.data)
    if loaded.kind == "qa" or (objective == "cost" and loaded.kind == "single"):
        needed = "preference" if objective == "cost" else "preference or single"
        raise ConfigError(
            f"task={objective} cannot learn from data.kind={loaded.kind} rows (needs {needed})"
        )
    loaded.write_skipped(run.run_dir)

    model_cfg = model_config(cfg, "policy")  # Safe RLHF starts score models from the SFT policy
    tokenizer = tokenizer_for(model_cfg, loaded.splits["train"])
    model = build_score_model(model_cfg, tokenizer)
    model.config.score_type = objective  # travels in config.json; evaluate_score reads it
    train, train_truncated = encode_pairs(
        cfg, objective, loaded.splits["train"], tokenizer, task.corrupted_pairs, with_gold=False
    )
    # The validation pairs as annotated: no corrupted copies.
    val, val_truncated = encode_pairs(cfg, objective, loaded.splits["test"], tokenizer)
    log_truncated(train_truncated, 2 * len(train), "train conversations", cfg.model.max_length)
    log_truncated(val_truncated, 2 * len(val), "validation conversations", cfg.model.max_length)

    module = ScoreModule(model, objective, task.lr, task.weight_decay, task.warmup_ratio, task.reg)
    data = ListDataModule(
        train,
        val,
        PairCollator(tokenizer.pad_token_id, pack_length(cfg.model)),
        task.batch_size,
        cfg.seed,
    )
    fit = fit_and_validate_best(run, module, data)

    artifact = Path(run.run_dir) / "artifacts" / objective
    export_artifact(fit.trainer, module.model, tokenizer, artifact)
    return TaskResult(
        metrics=fit.metrics | {"train/truncated": train_truncated, "val/truncated": val_truncated},
        artifacts={objective: str(artifact), "checkpoint": fit.best_checkpoint},
    )
