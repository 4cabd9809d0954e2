from collections import Counter

import pytest

from saferlhf.data.module import (
    ListDataset,
    PairCollator,
    ResumableDataLoader,
    ShardedSampler,
    TokenizedPairs,
    list_loader,
)


@pytest.mark.parametrize("num_examples, world_size", [(10, 1), (10, 2), (11, 2), (7, 3)])
def test_sharded_sampler_covers_every_example_exactly_once(num_examples, world_size):
    shards = [
        ShardedSampler(num_examples, True, seed=3, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for sampler in shards:
        sampler.set_epoch(1)
    seen = Counter(i for sampler in shards for i in sampler)
    real = {i: n for i, n in seen.items() if i < num_examples}
    assert real == {i: 1 for i in range(num_examples)}
    assert len({len(list(s)) for s in shards}) == 1  # equal shards, so DDP ranks step together
    assert sum(seen.values()) - num_examples < world_size  # at most world_size - 1 weight-0 slots


def test_epochs_reshuffle_deterministically():
    sampler = ShardedSampler(20, True, seed=0)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def _pairs(n):
    return TokenizedPairs(
        first=[[i, 1] for i in range(n)],
        second=[[i, 2, 3] for i in range(n)],
        first_sign=[-1.0] * n,
        second_sign=[1.0] * n,
        first_gold=[0.5] * n,
        second_gold=[0.1] * n,
    )


def test_padding_slots_have_weight_zero():
    dataset = ListDataset(_pairs(3))
    (_, weight_2), (padding, weight_3) = dataset[2], dataset[3]
    assert weight_2 == 1.0 and weight_3 == 0.0 and padding["first"] == [0, 1]


def test_pair_batches_stack_firsts_then_seconds():
    batch = next(iter(list_loader(_pairs(4), PairCollator(0), 2, False, 0)))
    assert batch["input_ids"].tolist() == [[0, 1, 0], [1, 1, 0], [0, 2, 3], [1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert batch["signs"].tolist() == [-1.0, -1.0, 1.0, 1.0]


def test_resumable_loader_skips_the_batches_already_trained_on():
    loader = list_loader(_pairs(10), PairCollator(0), 2, True, 5)
    assert isinstance(loader, ResumableDataLoader)
    full = [b["input_ids"][0, 0].item() for b in loader]
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    assert state == {"batches_yielded": 2}
    fresh = list_loader(_pairs(10), PairCollator(0), 2, True, 5)
    fresh.load_state_dict(state)
    assert [b["input_ids"][0, 0].item() for b in fresh] == full[2:]
    assert [b["input_ids"][0, 0].item() for b in fresh] == full  # the next epoch starts whole
