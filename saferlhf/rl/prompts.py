"""The prompts PPO samples its rollouts from, as a Lightning data module."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from saferlhf.data.module import list_loader


class PromptDataModule(pl.LightningDataModule):
    """``iterations`` batches of prompts per rank: seeded passes over the train prompts."""

    def __init__(
        self,
        prompts: list[str],
        prompt_ids: list[list[int]],
        iterations: int,
        batch_size: int,
        seed: int,
    ):
        super().__init__()
        self.prompts, self.prompt_ids = prompts, prompt_ids
        self.iterations, self.batch_size, self.seed = iterations, batch_size, seed

    def train_dataloader(self):
        world = self.trainer.world_size
        needed = self.iterations * self.batch_size * world
        generator = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        while len(order) < needed:
            order += torch.randperm(len(self.prompts), generator=generator).tolist()
        examples = [(self.prompts[i], self.prompt_ids[i]) for i in order[:needed]]
        collate = lambda items: {  # noqa: E731
            "prompts": [prompt for (prompt, _), _ in items],
            "prompt_ids": [ids for (_, ids), _ in items],
        }
        return list_loader(
            examples, collate, self.batch_size, False, self.seed, self.trainer.global_rank, world
        )
