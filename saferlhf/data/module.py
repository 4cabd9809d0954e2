"""Datasets and loaders for training: tokenized pairs, a sharded sampler, a resumable loader.

Two guarantees the stages rely on:
- every example is seen exactly once per epoch across all ranks (:class:`ShardedSampler`;
  padding slots that make ranks even carry weight 0), and
- a checkpoint taken mid-epoch resumes at the next unseen batch (:class:`ResumableDataLoader`,
  whose ``state_dict`` Lightning stores in its checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from saferlhf.data.collate import pack_sequences, pad_sequences, sequence_layout


class ShardedSampler(Sampler[int]):
    """This rank's share of a seeded permutation, reshuffled every epoch.

    Unlike ``DistributedSampler`` it never repeats a real example: the permutation is padded
    to a multiple of ``world_size`` with indices ``>= num_examples``, which a
    :class:`PairDataset` serves with weight 0.
    """

    def __init__(
        self, num_examples: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.num_examples, self.shuffle, self.seed = num_examples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.per_rank = math.ceil(num_examples / world_size)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at each epoch start
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            order = list(range(self.num_examples))
        order += range(self.num_examples, self.per_rank * self.world_size)  # weight-0 padding
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.per_rank


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint mid-epoch.

    Lightning saves ``state_dict()`` with every checkpoint and calls ``load_state_dict`` on
    resume; the next iteration then skips the batches the interrupted run already trained on.
    The sampler's order depends only on (seed, epoch), so the skipped batches are the same ones.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_yielded = 0
        self.resume_at = 0

    def __iter__(self):
        iterator = super().__iter__()
        skip, self.resume_at = self.resume_at, 0
        for _ in range(skip):
            next(iterator)
        self.batches_yielded = skip
        for batch in iterator:
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = state["batches_yielded"]


@dataclass
class TokenizedPairs:
    """Two token sequences per example (e.g. better/worse or safer/unsafer) and per-response
    extras: safety signs (+1 unsafe, -1 safe) and gold scores (NaN where no oracle exists)."""

    first: list[list[int]]
    second: list[list[int]]
    first_sign: list[float]
    second_sign: list[float]
    first_gold: list[float]
    second_gold: list[float]

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, i: int) -> dict:
        return {
            "first": self.first[i],
            "second": self.second[i],
            "signs": (self.first_sign[i], self.second_sign[i]),
            "gold": (self.first_gold[i], self.second_gold[i]),
        }


class PairCollator:
    """Stacks a batch of pairs as ``2B`` sequences, the B firsts then the B seconds: right-padded
    rows, or with ``pack_length`` packed into rows of that many tokens
    (:func:`~saferlhf.data.collate.pack_sequences`; ``ends`` then says where each one ends)."""

    def __init__(self, pad_token_id: int, pack_length: int | None = None):
        self.pad_token_id, self.pack_length = pad_token_id, pack_length

    def __call__(self, batch: Sequence[tuple[dict, float]]) -> dict[str, torch.Tensor]:
        items = [item for item, _ in batch]
        sequences = [item["first"] for item in items] + [item["second"] for item in items]
        layout = sequence_layout(sequences, self.pad_token_id, self.pack_length)
        per_response = lambda key: torch.tensor([i[key] for i in items], dtype=torch.float).T  # noqa: E731
        return layout | {
            "signs": per_response("signs").reshape(-1),  # (2, B) -> (2B,)
            "gold": per_response("gold").reshape(-1),  # (2B,)
            "weight": torch.tensor([weight for _, weight in batch], dtype=torch.float),  # (B,)
        }


class ListDataset(Dataset):
    """Examples held in a list; indices past the end are :class:`ShardedSampler` padding."""

    def __init__(self, examples: Sequence):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple:
        return self.examples[index % len(self.examples)], 1.0 if index < len(self.examples) else 0.0


class LanguageModelingCollator:
    """Right-pads ``(input_ids, labels)`` examples; labels are -100 where the loss is masked.

    With ``pack_length`` the examples are packed into rows of that many tokens instead
    (:func:`~saferlhf.data.collate.pack_sequences`): ``position_ids`` replace the attention
    mask, the labels of weight-0 examples (:class:`ShardedSampler`'s padding) are masked, and
    every row has weight 1.
    """

    def __init__(self, pad_token_id: int, pack_length: int | None = None):
        self.pad_token_id, self.pack_length = pad_token_id, pack_length

    def __call__(self, items: Sequence[tuple]) -> dict[str, torch.Tensor]:
        if self.pack_length is not None:
            packed = pack_sequences(
                [ids for (ids, _), _ in items],
                self.pack_length,
                self.pad_token_id,
                [labels if weight > 0 else [-100] * len(labels) for (_, labels), weight in items],
            )
            return {
                "input_ids": packed.input_ids,
                "position_ids": packed.position_ids,
                "labels": packed.labels,
                "weight": torch.ones(len(packed.input_ids)),
            }
        input_ids, attention_mask = pad_sequences([ids for (ids, _), _ in items], self.pad_token_id)
        labels, _ = pad_sequences([labels for (_, labels), _ in items], -100)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "weight": torch.tensor([weight for _, weight in items]),
        }


def list_loader(
    examples: Sequence,
    collate_fn,
    batch_size: int,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> ResumableDataLoader:
    sampler = ShardedSampler(len(examples), shuffle, seed, rank, world_size)
    return ResumableDataLoader(
        ListDataset(examples), batch_size=batch_size, sampler=sampler, collate_fn=collate_fn
    )


class ListDataModule(pl.LightningDataModule):
    """Train and validation examples in lists, batched by ``collate_fn``; each rank gets its
    :class:`ShardedSampler` share, and the loaders resume mid-epoch."""

    def __init__(self, train: Sequence, val: Sequence, collate_fn, batch_size: int, seed: int):
        super().__init__()
        self.train, self.val, self.collate_fn = train, val, collate_fn
        self.batch_size, self.seed = batch_size, seed

    def loader(self, examples: Sequence, shuffle: bool = False) -> ResumableDataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return list_loader(
            examples, self.collate_fn, self.batch_size, shuffle, self.seed, rank, world
        )

    def train_dataloader(self) -> ResumableDataLoader:
        return self.loader(self.train, shuffle=True)

    def val_dataloader(self) -> ResumableDataLoader:
        return self.loader(self.val)
