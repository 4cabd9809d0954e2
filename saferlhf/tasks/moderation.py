"""``saferlhf task=moderation``: a severity-sensitive moderation model.

One sequence-classification backbone with 23 outputs at the last token of the templated
(prompt, response): 19 multi-label harm-category logits (``HARM_CATEGORIES`` order) and a 4-way
severity head (0 safe .. 3 severe), as in PKU-SafeRLHF's moderation model (arXiv 2406.15513).
It trains on the QA items of the train split minus a seeded ``task.val_fraction`` holdout; the
holdout picks the best checkpoint (``task.monitor``) and then one probability threshold per
category (best F1); the test split gives the reported ``test/*`` metrics. The export,
``artifacts/moderation``, is a plain ``AutoModelForSequenceClassification`` folder whose
``config.moderation`` holds the thresholds; :class:`saferlhf.moderation.Moderator` loads it.
An item longer than ``model.max_length`` keeps its response's end (the heads read the last
token) and loses the start of its prompt first; ``train/truncated``, ``val/truncated`` and
``test/truncated`` count them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from saferlhf.data import views
from saferlhf.data.collate import encode_conversations, log_truncated, pad_sequences
from saferlhf.data.module import ListDataModule
from saferlhf.data.schema import HARM_CATEGORIES, SEVERITY_LEVELS
from saferlhf.data.sources import load_data
from saferlhf.errors import ConfigError
from saferlhf.models import build_score_model, save_artifact
from saferlhf.moderation.api import (
    NUM_CATEGORIES,
    NUM_LABELS,
    NUM_SEVERITIES,
    flag,
    over_threshold,
    split_logits,
)
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import (
    adamw_with_schedule,
    fit_and_validate_best,
    gather_across_ranks,
    model_config,
    tokenizer_for,
)

# A category with 1 positive in 300 would otherwise weigh its positives 300x: past about 10x
# the rare positives dominate the gradient and the logits lose calibration.
MAX_POS_WEIGHT = 10.0
# Candidate probability thresholds for each category (0.02 .. 0.98).
THRESHOLD_GRID = torch.linspace(0.02, 0.98, 49)
DEFAULT_THRESHOLD = 0.5  # for a category without positives in the holdout

# -- the loss -------------------------------------------------------------------------------


def moderation_loss(
    category_logits: torch.Tensor,
    severity_logits: torch.Tensor,
    category_targets: torch.Tensor,
    severity_targets: torch.Tensor,
    category_pos_weight: torch.Tensor | None,
    severity_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of an item's category set and severity.

    ``L = mean_i sum_c BCE(z_ic, y_ic; w_c) + CE(s_i, k_i; v)`` with
    ``BCE(z, y; w) = -w·y·log σ(z) - (1 - y)·log(1 - σ(z))`` summed over the 19 categories
    (the NLL of independent Bernoullis) and the weighted cross-entropy
    ``CE = sum_i v_{k_i}·(-log softmax(s_i)_{k_i}) / sum_i v_{k_i}`` (torch's weighted mean).

    Args:
        category_logits: ``(N, 19)``. severity_logits: ``(N, 4)``.
        category_targets: ``(N, 19)`` in {0, 1}. severity_targets: ``(N,)`` long, 0..3.
        category_pos_weight: ``(19,)`` weight ``w_c`` of positive terms, or None (all 1).
        severity_weight: ``(4,)`` class weights ``v``, or None (all 1).

    Returns:
        ``(loss, category_loss, severity_loss)``, scalars, ``loss = category + severity``.
    """
    category_loss = (
        F.binary_cross_entropy_with_logits(
            category_logits,
            category_targets.to(category_logits.dtype),
            pos_weight=category_pos_weight,
            reduction="none",
        )
        .sum(dim=-1)
        .mean()
    )
    severity_loss = F.cross_entropy(severity_logits, severity_targets, weight=severity_weight)
    return category_loss + severity_loss, category_loss, severity_loss


# -- class balance: (category targets (N, 19), severity targets (N,)) -> (pos_weight, weight) --


def no_balance(
    category_targets: torch.Tensor, severity_targets: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return None, None


def balanced_weights(
    category_targets: torch.Tensor, severity_targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive weight ``neg_c / pos_c`` per category, clipped to ``[0, MAX_POS_WEIGHT]``, and
    inverse-frequency severity weights ``N / (4 · count_k)`` (scikit-learn's "balanced")."""
    positives = category_targets.float().sum(dim=0)  # (19,)
    negatives = len(category_targets) - positives
    pos_weight = (negatives / positives.clamp(min=1)).clamp(max=MAX_POS_WEIGHT)
    counts = torch.bincount(severity_targets, minlength=NUM_SEVERITIES).float()  # (4,)
    severity_weight = len(severity_targets) / (NUM_SEVERITIES * counts.clamp(min=1))
    return pos_weight, severity_weight


CLASS_BALANCE: dict[str, Callable] = {"none": no_balance, "balanced": balanced_weights}

# -- metrics (tensors in, numbers out) -------------------------------------------------------


def binary_prf(predicted: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of ``(N,)`` bool predictions; 0 where a ratio is 0/0."""
    tp = (predicted & gold).sum().item()
    fp = (predicted & ~gold).sum().item()
    fn = (~predicted & gold).sum().item()
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
    }


def choose_thresholds(
    category_probs: torch.Tensor, category_targets: torch.Tensor, grid: torch.Tensor
) -> torch.Tensor:
    """Per category, the ``grid`` threshold (predict ``prob > t``) with the best F1: ``(19,)``.

    ``category_probs`` and ``category_targets`` are ``(N, C)``. Among thresholds that tie for
    the best F1 the median one is taken (the widest margin on both sides); a category without
    positives keeps ``DEFAULT_THRESHOLD``.
    """
    gold = category_targets.bool().unsqueeze(0)  # (1, N, C)
    predicted = category_probs.unsqueeze(0) > grid.view(-1, 1, 1)  # (G, N, C)
    tp = (predicted & gold).sum(dim=1)  # (G, C)
    fp = (predicted & ~gold).sum(dim=1)
    fn = (~predicted & gold).sum(dim=1)
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)  # (G, C)
    thresholds = torch.full((category_probs.shape[1],), DEFAULT_THRESHOLD)
    for c in range(category_probs.shape[1]):
        if gold[0, :, c].any():
            tied = grid[f1[:, c] == f1[:, c].max()]
            thresholds[c] = tied[(len(tied) - 1) // 2]
    return thresholds


def severity_confusion(predicted: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """``(4, 4)`` counts: row = gold severity, column = predicted severity."""
    cells = torch.bincount(gold * NUM_SEVERITIES + predicted, minlength=NUM_SEVERITIES**2)
    return cells.view(NUM_SEVERITIES, NUM_SEVERITIES)


def metric_name(category: str) -> str:
    return category.replace(" ", "_")


def moderation_metrics(
    category_probs: torch.Tensor,
    severity_pred: torch.Tensor,
    thresholds: torch.Tensor,
    category_targets: torch.Tensor,
    severity_targets: torch.Tensor,
    is_safe: torch.Tensor,
    per_category: bool = True,
) -> dict[str, float]:
    """The moderation metrics (unprefixed names) for ``N`` items.

    ``category_probs`` ``(N, 19)``, ``severity_pred`` ``(N,)``, ``thresholds`` ``(19,)``,
    ``category_targets`` ``(N, 19)``, ``severity_targets`` ``(N,)``, ``is_safe`` ``(N,)`` bool.
    An item is flagged as unsafe by :func:`saferlhf.moderation.api.flag` (severity > 0 or any
    category over threshold); ``category_exact_match`` compares predicted and gold category sets
    over all items (an empty set matches an empty set); ``mean_accuracy`` averages those three
    accuracies; ``category_macro_f1`` averages F1 over the categories with gold positives.
    """
    gold_categories = category_targets.bool()
    predicted_categories = over_threshold(category_probs, thresholds)
    flagged = flag(category_probs, thresholds, severity_pred, max_severity=0)
    unsafe = ~is_safe.bool()
    safety = binary_prf(flagged, unsafe)
    metrics = {
        "safety_accuracy": (flagged == unsafe).float().mean().item(),
        "unsafe_precision": safety["precision"],
        "unsafe_recall": safety["recall"],
        "unsafe_f1": safety["f1"],
        "category_exact_match": (predicted_categories == gold_categories)
        .all(dim=-1)
        .float()
        .mean()
        .item(),
        "severity_accuracy": (severity_pred == severity_targets).float().mean().item(),
    }
    headline = ("safety_accuracy", "category_exact_match", "severity_accuracy")
    metrics["mean_accuracy"] = sum(metrics[name] for name in headline) / len(headline)
    f1s = []
    for c, name in enumerate(HARM_CATEGORIES):
        scores = binary_prf(predicted_categories[:, c], gold_categories[:, c])
        if gold_categories[:, c].any():
            f1s.append(scores["f1"])
        if per_category:
            metrics |= {f"category/{metric_name(name)}/{k}": v for k, v in scores.items()}
    metrics["category_macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    return metrics


# -- data ------------------------------------------------------------------------------------


@dataclass
class TokenizedItems:
    """Templated (prompt, response) token ids with their labels, one entry per QA item."""

    input_ids: list[list[int]]
    categories: list[list[float]]  # 19 flags per item, HARM_CATEGORIES order
    severity: list[int]
    is_safe: list[bool]
    truncated: list[bool]  # longer than max_length, so cut to fit

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> TokenizedItems:
        return TokenizedItems(
            [self.input_ids[i] for i in indices],
            [self.categories[i] for i in indices],
            [self.severity[i] for i in indices],
            [self.is_safe[i] for i in indices],
            [self.truncated[i] for i in indices],
        )

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.input_ids[i],
            "categories": self.categories[i],
            "severity": self.severity[i],
            "is_safe": self.is_safe[i],
        }

    def category_targets(self) -> torch.Tensor:
        return torch.tensor(self.categories, dtype=torch.float).view(-1, NUM_CATEGORIES)

    def severity_targets(self) -> torch.Tensor:
        return torch.tensor(self.severity, dtype=torch.long)


def tokenized_items(
    items: Sequence[views.QAItem], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedItems:
    encoded = encode_conversations(
        tokenizer, [i.prompt for i in items], [i.response for i in items], max_length
    )
    return TokenizedItems(
        input_ids=encoded.examples,
        categories=[[float(name in i.categories) for name in HARM_CATEGORIES] for i in items],
        severity=[i.severity for i in items],
        is_safe=[i.is_safe for i in items],
        truncated=encoded.truncated,
    )


def holdout_split(num_items: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded ``(train, holdout)`` split of ``range(num_items)``; the holdout has
    ``round(fraction · num_items)`` items, at least one, and train keeps at least one."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"task.val_fraction={fraction!r}: expected a share in (0, 1)")
    size = round(fraction * num_items)
    if num_items < 2 or not 0 < size < num_items:
        raise ConfigError(
            f"task.val_fraction={fraction} of {num_items} items leaves an empty train or holdout"
        )
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[size:]), sorted(order[:size])


class ItemCollator:
    """Right-pads a batch of items (the backbone reads the last non-pad token)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[tuple[dict, float]]) -> dict[str, torch.Tensor]:
        batch = [item for item, _ in examples]
        input_ids, attention_mask = pad_sequences(
            [b["input_ids"] for b in batch], self.pad_token_id, side="right"
        )
        return {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": attention_mask,
            "categories": torch.tensor([b["categories"] for b in batch]),  # (B, 19)
            "severity": torch.tensor([b["severity"] for b in batch]),  # (B,)
            "is_safe": torch.tensor([float(b["is_safe"]) for b in batch]),  # (B,)
            "weight": torch.tensor([weight for _, weight in examples]),  # (B,)
        }


# -- the module ------------------------------------------------------------------------------


class ModerationModule(pl.LightningModule):
    """Category and severity heads trained with :func:`moderation_loss`.

    Validation (``val/*``) and test (``test/*``) gather every rank's predictions, compute
    :func:`moderation_metrics` with ``self.thresholds`` and keep them in ``self.outputs``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
        category_pos_weight: torch.Tensor | None = None,
        severity_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "category_pos_weight", "severity_weight"])
        self.model = model
        # Derived from the train items on every (re)start: not part of the checkpoint.
        self.register_buffer("category_pos_weight", category_pos_weight, persistent=False)
        self.register_buffer("severity_weight", severity_weight, persistent=False)
        self.register_buffer(
            "thresholds", torch.full((NUM_CATEGORIES,), DEFAULT_THRESHOLD), persistent=False
        )
        self._batches: list[dict[str, torch.Tensor]] = []
        self.outputs: dict[str, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return output.logits.float()

    def training_step(self, batch, batch_idx):
        category_logits, severity_logits = split_logits(
            self(batch["input_ids"], batch["attention_mask"])
        )  # (B, 19), (B, 4)
        real = batch["weight"] > 0  # ShardedSampler's padding slots carry weight 0
        if not real.any():
            return category_logits.sum() * 0.0  # keep every rank's backward in step under DDP
        loss, category_loss, severity_loss = moderation_loss(
            category_logits[real],
            severity_logits[real],
            batch["categories"][real],
            batch["severity"][real],
            self.category_pos_weight,
            self.severity_weight,
        )
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/category_loss": category_loss, "train/severity_loss": severity_loss})
        return loss

    def _collect(self, batch) -> None:
        category_logits, severity_logits = split_logits(
            self(batch["input_ids"], batch["attention_mask"])
        )
        self._batches.append(
            {
                "category_probs": category_logits.sigmoid(),
                "severity_pred": severity_logits.argmax(dim=-1),
                "categories": batch["categories"],
                "severity": batch["severity"],
                "is_safe": batch["is_safe"],
                "weight": batch["weight"],
            }
        )

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
        keys = ("category_probs", "severity_pred", "categories", "severity", "is_safe")
        self.outputs = {key: self._gathered(key)[real].cpu() for key in keys}
        out = self.outputs
        metrics = moderation_metrics(
            out["category_probs"],
            out["severity_pred"],
            self.thresholds.cpu(),
            out["categories"],
            out["severity"],
            out["is_safe"].bool(),
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


# -- export and reports ----------------------------------------------------------------------


def label_outputs(model: PreTrainedModel) -> None:
    """Name the 23 outputs in ``config.id2label``: the categories, then ``severity:<level>``."""
    names = [*HARM_CATEGORIES, *(f"severity:{SEVERITY_LEVELS[k]}" for k in range(NUM_SEVERITIES))]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def export_moderator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    thresholds: Sequence[float],
    max_length: int,
    directory: str | Path,
) -> Path:
    """Write a moderation model folder: the HF model with ``config.moderation`` (categories,
    per-category thresholds, severity levels, the max_length it was trained with)."""
    label_outputs(model)
    model.config.moderation = {
        "categories": list(HARM_CATEGORIES),
        "thresholds": [round(float(t), 4) for t in thresholds],
        "severity_levels": [SEVERITY_LEVELS[k] for k in range(NUM_SEVERITIES)],
        "max_length": int(max_length),
    }
    return save_artifact(model, tokenizer, directory)


def plot_confusion(confusion: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [f"{k} {SEVERITY_LEVELS[k]}" for k in range(NUM_SEVERITIES)]
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(confusion.numpy(), cmap="Blues")
    for gold in range(NUM_SEVERITIES):
        for pred in range(NUM_SEVERITIES):
            count = int(confusion[gold, pred])
            dark = count > confusion.max().item() / 2
            ax.text(pred, gold, str(count), ha="center", va="center", color="w" if dark else "k")
    ax.set_xticks(range(NUM_SEVERITIES), levels)
    ax.set_yticks(range(NUM_SEVERITIES), levels)
    ax.set_xlabel("predicted severity")
    ax.set_ylabel("gold severity")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_confusion(confusion: torch.Tensor, run_dir: Path, accuracy: float) -> dict[str, str]:
    json_path, png_path = run_dir / "severity_confusion.json", run_dir / "severity_confusion.png"
    levels = [SEVERITY_LEVELS[k] for k in range(NUM_SEVERITIES)]
    report = {"rows": "gold", "columns": "predicted", "levels": levels}
    json_path.write_text(json.dumps(report | {"matrix": confusion.tolist()}, indent=2) + "\n")
    plot_confusion(confusion, png_path, f"test severity (accuracy {accuracy:.3f})")
    return {"severity_confusion": str(json_path), "severity_confusion_plot": str(png_path)}


# -- the task --------------------------------------------------------------------------------


def moderation_task(run: RunContext) -> TaskResult:
    cfg, task = run.cfg, run.cfg.task
    if task.class_balance not in CLASS_BALANCE:
        raise ConfigError(
            f"task.class_balance={task.class_balance!r}: expected one of {sorted(CLASS_BALANCE)}"
        )
    loaded = load_data(cfg.data)
    if loaded.kind == "single":
        raise ConfigError(
            "task=moderation needs safety labels (is_safe, categories, severity); "
            "data.kind=single rows have none: use preference=dual or data.kind=qa"
        )
    loaded.write_skipped(run.run_dir)

    model_cfg = model_config(cfg, "policy")  # like the score models: start from the SFT policy
    tokenizer = tokenizer_for(model_cfg, loaded.splits["train"])
    model = build_score_model(model_cfg, tokenizer, num_labels=NUM_LABELS)
    label_outputs(model)
    max_length = cfg.model.max_length
    items = tokenized_items(views.qa_items(loaded.splits["train"]), tokenizer, max_length)
    test = tokenized_items(views.qa_items(loaded.splits["test"]), tokenizer, max_length)
    train_ids, holdout_ids = holdout_split(len(items), task.val_fraction, cfg.seed)
    train, holdout = items.subset(train_ids), items.subset(holdout_ids)
    truncated = {}
    for name, split in (("train", train), ("val", holdout), ("test", test)):
        truncated[f"{name}/truncated"] = sum(split.truncated)
        log_truncated(sum(split.truncated), len(split), f"{name} items", max_length)

    pos_weight, severity_weight = CLASS_BALANCE[task.class_balance](
        train.category_targets(), train.severity_targets()
    )
    module = ModerationModule(
        model, task.lr, task.weight_decay, task.warmup_ratio, pos_weight, severity_weight
    )
    data = ListDataModule(
        train, holdout, ItemCollator(tokenizer.pad_token_id), task.batch_size, cfg.seed
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
    confusion = severity_confusion(out["severity_pred"], out["severity"])

    artifact = Path(run.run_dir) / "artifacts" / "moderation"
    artifacts = {"moderation": str(artifact), "checkpoint": fit.best_checkpoint}
    if fit.trainer.is_global_zero:
        export_moderator(module.model, tokenizer, thresholds.tolist(), max_length, artifact)
        artifacts |= write_confusion(
            confusion, Path(run.run_dir), test_metrics["test/severity_accuracy"]
        )
    metrics = {name: float(value) for name, value in (val_metrics | test_metrics).items()}
    return TaskResult(metrics=metrics | truncated, artifacts=artifacts)
