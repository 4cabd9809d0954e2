"""Score-model metrics as pure tensor functions (no modules, no logging)."""

from __future__ import annotations

import torch


def pairwise_accuracy(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Share of pairs scored ``first > second``; shapes ``(num_pairs,)``."""
    return (first > second).float().mean()


def sign_accuracy(costs: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Share of responses whose cost has the sign of its label (+1 unsafe, -1 safe)."""
    return ((costs > 0) == (signs > 0)).float().mean()


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 1 with ties given their average rank (as scipy.stats.rankdata)."""
    values = values.double()
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.double)
    unique, inverse = values.unique(return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.double).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=torch.double).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of two ``(n,)`` tensors (Pearson on average ranks)."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return (rx * ry).sum() / denominator if denominator > 0 else torch.zeros((), dtype=torch.double)
