import math

import pytest
import torch

from saferlhf.evaluate.metrics import pairwise_accuracy, sign_accuracy, spearman
from saferlhf.tasks.common import cosine_with_warmup


def test_pairwise_and_sign_accuracy():
    assert pairwise_accuracy(
        torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    ) == pytest.approx(1 / 3)
    costs = torch.tensor([0.5, -0.2, 0.1, -3.0])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert sign_accuracy(costs, signs) == pytest.approx(0.5)


def test_spearman_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x * 10) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Ties share their average rank: y ranks (1, 2.5, 2.5, 4) against x ranks (1, 2, 3, 4).
    y = torch.tensor([0.0, 5.0, 5.0, 9.0])
    rx = [1, 2, 3, 4]
    ry = [1, 2.5, 2.5, 4]
    cov = sum((a - 2.5) * (b - 2.5) for a, b in zip(rx, ry, strict=True))
    expected = cov / math.sqrt(sum((a - 2.5) ** 2 for a in rx) * sum((b - 2.5) ** 2 for b in ry))
    assert spearman(x, y) == pytest.approx(expected)
    assert spearman(x, torch.ones(4)) == 0.0  # no variation, no correlation


def test_cosine_with_warmup_by_hand():
    assert cosine_with_warmup(0, warmup_steps=4, total_steps=20) == pytest.approx(0.25)
    assert cosine_with_warmup(3, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    assert cosine_with_warmup(12, warmup_steps=4, total_steps=20) == pytest.approx(0.5)  # half way
    assert cosine_with_warmup(20, warmup_steps=4, total_steps=20) == pytest.approx(0.0)
    assert cosine_with_warmup(25, warmup_steps=4, total_steps=20) == pytest.approx(0.0)
