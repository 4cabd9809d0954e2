"""Moderation metrics (tensors in, numbers out) and the reports a moderation run writes.

Precision, recall, F1 and the severity confusion matrix are torchmetrics'; the per-category
threshold search and the headline accuracies are here. Category metrics are named
``category/<key>/<metric>`` with ``key = saferlhf.taxonomy.category_key(name)``;
``category_metrics.json`` maps each key back to its name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchmetrics.functional.classification import (
    binary_f1_score,
    binary_precision,
    binary_recall,
    multiclass_confusion_matrix,
    multilabel_f1_score,
    multilabel_precision,
    multilabel_recall,
)

from saferlhf.moderation.api import flag, over_threshold
from saferlhf.taxonomy import NUM_SEVERITIES, SEVERITY_LEVELS, Taxonomy, category_key

# Candidate probability thresholds for each category (0.02 .. 0.98).
THRESHOLD_GRID = torch.linspace(0.02, 0.98, 49)
DEFAULT_THRESHOLD = 0.5  # for a category without positives in the holdout


def binary_prf(predicted: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of ``(N,)`` bool predictions; 0 where a ratio is 0/0."""
    predicted, gold = predicted.long(), gold.long()
    return {
        "precision": binary_precision(predicted, gold).item(),
        "recall": binary_recall(predicted, gold).item(),
        "f1": binary_f1_score(predicted, gold).item(),
    }


def choose_thresholds(
    category_probs: torch.Tensor, category_targets: torch.Tensor, grid: torch.Tensor
) -> torch.Tensor:
    """Per category, the ``grid`` threshold (predict ``prob > t``) with the best F1: ``(C,)``.

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
    return multiclass_confusion_matrix(predicted, gold, num_classes=NUM_SEVERITIES)


def moderation_metrics(
    category_probs: torch.Tensor,
    severity_pred: torch.Tensor | None,
    thresholds: torch.Tensor,
    category_targets: torch.Tensor,
    severity_targets: torch.Tensor | None,
    is_safe: torch.Tensor,
    taxonomy: Taxonomy,
    per_category: bool = True,
) -> dict[str, float]:
    """The moderation metrics (unprefixed names) for ``N`` items and ``C`` categories.

    ``category_probs`` ``(N, C)``, ``severity_pred`` ``(N,)``, ``thresholds`` ``(C,)``,
    ``category_targets`` ``(N, C)``, ``severity_targets`` ``(N,)``, ``is_safe`` ``(N,)`` bool;
    the severity tensors are None for a taxonomy without severity levels, which then has no
    ``severity_accuracy``. An item is flagged as unsafe by :func:`saferlhf.moderation.api.flag`
    (severity > 0 or any category over threshold); ``category_exact_match`` compares predicted
    and gold category sets over all items (an empty set matches an empty set);
    ``mean_accuracy`` averages the safety, exact-match and severity accuracies there are;
    ``category_macro_f1`` averages F1 over the categories with gold positives.
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
    }
    headline = ["safety_accuracy", "category_exact_match"]
    if severity_pred is not None:
        metrics["severity_accuracy"] = (severity_pred == severity_targets).float().mean().item()
        headline.append("severity_accuracy")
    metrics["mean_accuracy"] = sum(metrics[name] for name in headline) / len(headline)
    scores = _per_category(predicted_categories, gold_categories)
    with_gold = gold_categories.any(dim=0).tolist()
    f1s = [f1 for f1, has_gold in zip(scores["f1"], with_gold, strict=True) if has_gold]
    metrics["category_macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    if per_category:
        for c, name in enumerate(taxonomy.categories):
            metrics |= {f"category/{category_key(name)}/{k}": v[c] for k, v in scores.items()}
    return metrics


def _per_category(predicted: torch.Tensor, gold: torch.Tensor) -> dict[str, list[float]]:
    """Precision, recall and F1 of each of the ``C`` columns of ``(N, C)`` bool tensors."""
    predicted, gold = predicted.long(), gold.long()
    num_labels = predicted.shape[1]
    return {
        name: function(predicted, gold, num_labels=num_labels, average=None).tolist()
        for name, function in (
            ("precision", multilabel_precision),
            ("recall", multilabel_recall),
            ("f1", multilabel_f1_score),
        )
    }


# -- reports ---------------------------------------------------------------------------------


def write_category_report(
    metrics: dict[str, float], thresholds: torch.Tensor, taxonomy: Taxonomy, run_dir: Path
) -> Path:
    """``category_metrics.json``: each category by its own name, with its metric key, its
    threshold and its test precision, recall and F1 (``metrics`` holds ``test/category/*``)."""
    categories = [
        {
            "name": name,
            "metric_key": key,
            "threshold": round(float(thresholds[c]), 4),
            **{k: metrics[f"test/category/{key}/{k}"] for k in ("precision", "recall", "f1")},
        }
        for c, (key, name) in enumerate(taxonomy.metric_keys().items())
    ]
    path = run_dir / "category_metrics.json"
    report = {"taxonomy": taxonomy.name, "categories": categories}
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


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
