"""``saferlhf task=moderation``: a severity-sensitive moderation model.

One sequence-classification backbone with outputs at the last token of the templated
(prompt, response): one multi-label logit per category of the run's taxonomy
(``cfg.taxonomy``), and a 4-way severity head (0 safe .. 3 severe) when the taxonomy has
severity levels, as in PKU-SafeRLHF's moderation model (arXiv 2406.15513). BeaverTails rows have
no severity: their model has no severity head, flags an item when any category is over its
threshold, and reports no severity metrics. It trains on the QA items of the train split minus
a seeded ``task.val_fraction`` holdout; the holdout picks the best checkpoint
(``task.monitor``) and then one probability threshold per category (best F1); the test split
gives the reported ``test/*`` metrics, per category as ``test/category/<key>/*`` with
``category_metrics.json`` giving each key's category name. The export,
``artifacts/moderation``, is a plain ``AutoModelForSequenceClassification`` folder whose
``config.moderation`` holds the taxonomy and the thresholds;
:class:`saferlhf.moderation.Moderator` loads it. An item longer than ``model.max_length`` keeps
its response's end (the heads read the last token) and loses the start of its prompt first;
``train/truncated``, ``val/truncated`` and ``test/truncated`` count them.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from transformers import PreTrainedModel

from saferlhf.data import views
from saferlhf.data.collate import log_truncated
from saferlhf.data.moderation import CLASS_BALANCE, ItemCollator, holdout_split, tokenized_items
from saferlhf.data.module import ListDataModule
from saferlhf.data.sources import load_data
from saferlhf.errors import ConfigError
from saferlhf.evaluate.moderation_metrics import (
    DEFAULT_THRESHOLD,
    THRESHOLD_GRID,
    choose_thresholds,
    moderation_metrics,
    severity_confusion,
    write_category_report,
    write_confusion,
)
from saferlhf.losses import moderation_loss
from saferlhf.models import build_score_model
from saferlhf.models.sharding import shard_for_strategy, unsharded_copy
from saferlhf.moderation.api import export_moderator, label_outputs, split_logits
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import (
    adamw_with_schedule,
    fit_and_validate_best,
    gather_across_ranks,
    last_token_logits,
    model_config,
    pack_length,
    tokenizer_for,
)
from saferlhf.taxonomy import Taxonomy, taxonomy_from_config

# -- the module ------------------------------------------------------------------------------


class ModerationModule(pl.LightningModule):
    """Category heads (and a severity head when the taxonomy has one) trained with
    :func:`saferlhf.losses.moderation_loss`.

    Validation (``val/*``) and test (``test/*``) gather every rank's predictions, compute
    :func:`moderation_metrics` with ``self.thresholds`` and keep them in ``self.outputs``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        taxonomy: Taxonomy,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
        category_pos_weight: torch.Tensor | None = None,
        severity_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            ignore=["model", "taxonomy", "category_pos_weight", "severity_weight"]
        )
        self.model = model.train()  # from_pretrained returns eval mode: dropout would stay off
        self.taxonomy = taxonomy
        # Derived from the train items on every (re)start: not part of the checkpoint.
        self.register_buffer("category_pos_weight", category_pos_weight, persistent=False)
        self.register_buffer("severity_weight", severity_weight, persistent=False)
        self.register_buffer(
            "thresholds",
            torch.full((taxonomy.num_categories,), DEFAULT_THRESHOLD),
            persistent=False,
        )
        self._batches: list[dict[str, torch.Tensor]] = []
        self.outputs: dict[str, torch.Tensor] = {}

    def configure_model(self) -> None:
        shard_for_strategy(self, [self.model])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's logits for each item of an :class:`~saferlhf.data.moderation.ItemCollator`
        batch, padded or packed, ``(B, num_labels)``."""
        return last_token_logits(self.model, batch).float()

    def _heads(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Category logits ``(B, C)`` and severity logits ``(B, 4)`` or None."""
        return split_logits(self(batch), self.taxonomy)

    def training_step(self, batch, batch_idx):
        category_logits, severity_logits = self._heads(batch)
        real = batch["weight"] > 0  # ShardedSampler's padding slots carry weight 0
        if not real.any():
            return category_logits.sum() * 0.0  # keep every rank's backward in step under DDP
        has_severity = severity_logits is not None
        loss, category_loss, severity_loss = moderation_loss(
            category_logits[real],
            severity_logits[real] if has_severity else None,
            batch["categories"][real],
            batch["severity"][real] if has_severity else None,
            self.category_pos_weight,
            self.severity_weight,
        )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/category_loss", category_loss)
        if has_severity:
            self.log("train/severity_loss", severity_loss)
        return loss

    def _collect(self, batch) -> None:
        category_logits, severity_logits = self._heads(batch)
        collected = {
            "category_probs": category_logits.sigmoid(),
            "categories": batch["categories"],
            "is_safe": batch["is_safe"],
            "weight": batch["weight"],
        }
        if severity_logits is not None:
            collected["severity_pred"] = severity_logits.argmax(dim=-1)
            collected["severity"] = batch["severity"]
        self._batches.append(collected)

    def validation_step(self, batch, batch_idx):
        self._collect(batch)

    def test_step(self, batch, batch_idx):
        self._collect(batch)

    def on_validation_epoch_start(self) -> None:
        self._batches = []

    def on_test_epoch_start(self) -> None:
        self._batches = []

    def _gathered(self, key: str) -> torch.Tensor:
        return gather_across_ranks(self, self._batches, key)

    def _evaluate(self, prefix: str, per_category: bool) -> None:
        real = self._gathered("weight") > 0
        keys = [key for key in self._batches[0] if key != "weight"]
        self.outputs = {key: self._gathered(key)[real].cpu() for key in keys}
        out = self.outputs
        metrics = moderation_metrics(
            out["category_probs"],
            out.get("severity_pred"),
            self.thresholds.cpu(),
            out["categories"],
            out.get("severity"),
            out["is_safe"].bool(),
            self.taxonomy,
            per_category=per_category,
        )
        # Every rank holds the same gathered values: the sync averages identical numbers.
        self.log_dict(
            {f"{prefix}/{name}": torch.tensor(value) for name, value in metrics.items()},
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val", per_category=False)

    def on_test_epoch_end(self) -> None:
        self._evaluate("test", per_category=True)

    def configure_optimizers(self):
        h = self.hparams
        steps_per_epoch = len(self.trainer.datamodule.train_dataloader())
        return adamw_with_schedule(
            self, self.model.parameters(), h.lr, h.weight_decay, h.warmup_ratio, steps_per_epoch
        )


# -- the task --------------------------------------------------------------------------------


def moderation_task(run: RunContext) -> TaskResult:
    cfg, task = run.cfg, run.cfg.task
    if task.class_balance not in CLASS_BALANCE:
        raise ConfigError(
            f"task.class_balance={task.class_balance!r}: expected one of {sorted(CLASS_BALANCE)}"
        )
    taxonomy = taxonomy_from_config(cfg.taxonomy)
    loaded = load_data(cfg.data, taxonomy)
    if loaded.kind == "single":
        raise ConfigError(
            "task=moderation needs safety labels (is_safe, categories, severity); "
            "data.kind=single rows have none: use preference=dual or data.kind=qa"
        )
    loaded.write_skipped(run.run_dir)

    model_cfg = model_config(cfg, "policy")  # like the score models: start from the SFT policy
    tokenizer = tokenizer_for(model_cfg, loaded.splits["train"])
    model = build_score_model(model_cfg, tokenizer, num_labels=taxonomy.num_labels)
    label_outputs(model, taxonomy)
    max_length = cfg.model.max_length
    items, test = (
        tokenized_items(views.qa_items(loaded.splits[split]), tokenizer, max_length, taxonomy)
        for split in ("train", "test")
    )
    train_ids, holdout_ids = holdout_split(len(items), task.val_fraction, cfg.seed)
    train, holdout = items.subset(train_ids), items.subset(holdout_ids)
    truncated = {}
    for name, split in (("train", train), ("val", holdout), ("test", test)):
        truncated[f"{name}/truncated"] = sum(split.truncated)
        log_truncated(sum(split.truncated), len(split), f"{name} items", max_length)

    pos_weight, severity_weight = CLASS_BALANCE[task.class_balance](
        train.category_targets(taxonomy.num_categories), train.severity_targets()
    )
    module = ModerationModule(
        model, taxonomy, task.lr, task.weight_decay, task.warmup_ratio, pos_weight, severity_weight
    )
    data = ListDataModule(
        train,
        holdout,
        ItemCollator(tokenizer.pad_token_id, pack_length(cfg.model)),
        task.batch_size,
        cfg.seed,
    )
    fit = fit_and_validate_best(run, module, data)

    # The best checkpoint's holdout predictions choose the thresholds (val/* use 0.5) ...
    val_metrics = fit.metrics
    out = module.outputs
    thresholds = choose_thresholds(out["category_probs"], out["categories"], THRESHOLD_GRID)
    module.thresholds.copy_(thresholds)
    # ... and the test split, never seen before, gives the reported metrics.
    (test_metrics,) = fit.trainer.test(module, dataloaders=data.loader(test), verbose=False)
    out = module.outputs

    run_dir = Path(run.run_dir)
    artifact = run_dir / "artifacts" / "moderation"
    artifacts = {"moderation": str(artifact), "checkpoint": fit.best_checkpoint}
    model = unsharded_copy(module.model, fit.trainer.is_global_zero)  # every rank gathers
    if fit.trainer.is_global_zero:
        export_moderator(model, tokenizer, thresholds.tolist(), max_length, artifact, taxonomy)
        report = write_category_report(test_metrics, thresholds, taxonomy, run_dir)
        artifacts["category_metrics"] = str(report)
        if taxonomy.has_severity:
            confusion = severity_confusion(out["severity_pred"], out["severity"])
            accuracy = test_metrics["test/severity_accuracy"]
            artifacts |= write_confusion(confusion, run_dir, accuracy)
    metrics = {name: float(value) for name, value in (val_metrics | test_metrics).items()}
    return TaskResult(metrics=metrics | truncated, artifacts=artifacts)
