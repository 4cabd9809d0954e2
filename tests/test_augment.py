"""Corrupted copies of responses and the pairs that rank a response above them."""

import random

import pytest

from saferlhf.data.augment import corrupt, corrupted_pairs
from saferlhf.data.benchmark import Oracle, generate_benchmark
from saferlhf.data.views import preference_pairs


@pytest.fixture(scope="module")
def pairs():
    rows = generate_benchmark(
        num_train=300, num_test=0, seed=0, label_noise=0.0, benign_fraction=0.35
    )["train"]
    return preference_pairs(rows)


def test_a_corrupted_copy_always_differs_and_the_oracle_calls_it_worse(pairs):
    rng, oracle = random.Random(0), Oracle()
    pool = sorted({word for pair in pairs for word in pair.chosen.split()})
    worse = 0
    for pair in pairs:
        copy = corrupt(pair.chosen, rng, pool)
        assert copy != pair.chosen
        before, after = oracle.score(pair.prompt, pair.chosen), oracle.score(pair.prompt, copy)
        worse += after.helpfulness < before.helpfulness or not after.clean
    assert worse / len(pairs) > 0.95
    assert corrupt("", rng, pool) in pool


def test_corrupted_pairs_are_seeded_and_sized_by_the_fraction(pairs):
    extra = corrupted_pairs(pairs, 0.5, seed=3)
    assert len(extra) == round(0.5 * len(pairs))
    assert extra == corrupted_pairs(pairs, 0.5, seed=3) != corrupted_pairs(pairs, 0.5, seed=4)
    originals = {(p.prompt, text) for p in pairs for text in (p.chosen, p.rejected)}
    assert all((p.prompt, p.chosen) in originals and p.rejected != p.chosen for p in extra)
    assert corrupted_pairs(pairs, 0.0, seed=3) == []
    with pytest.raises(ValueError, match="corrupted-pair fraction"):
        corrupted_pairs(pairs, 1.5, seed=3)
