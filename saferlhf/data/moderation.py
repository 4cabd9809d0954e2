"""Moderation data: tokenized QA items with their labels, the holdout split, class weights and
the collator. Labels follow a :class:`saferlhf.taxonomy.Taxonomy`: one flag per category in
its order, and a severity level only when the taxonomy has them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from saferlhf.data.collate import encode_conversations, sequence_layout
from saferlhf.data.views import QAItem
from saferlhf.errors import ConfigError
from saferlhf.taxonomy import NUM_SEVERITIES, PKU_SAFERLHF, Taxonomy

# A category with 1 positive in 300 would otherwise weigh its positives 300x: past about 10x
# the rare positives dominate the gradient and the logits lose calibration.
MAX_POS_WEIGHT = 10.0


@dataclass
class TokenizedItems:
    """Templated (prompt, response) token ids with their labels, one entry per QA item."""

    input_ids: list[list[int]]
    categories: list[list[float]]  # one flag per category, in the taxonomy's order
    severity: list[int] | None  # None when the taxonomy has no severity levels
    is_safe: list[bool]
    truncated: list[bool]  # longer than max_length, so cut to fit

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> TokenizedItems:
        return TokenizedItems(
            [self.input_ids[i] for i in indices],
            [self.categories[i] for i in indices],
            None if self.severity is None else [self.severity[i] for i in indices],
            [self.is_safe[i] for i in indices],
            [self.truncated[i] for i in indices],
        )

    def __getitem__(self, i: int) -> dict:
        item = {
            "input_ids": self.input_ids[i],
            "categories": self.categories[i],
            "is_safe": self.is_safe[i],
        }
        if self.severity is not None:
            item["severity"] = self.severity[i]
        return item

    def category_targets(self, num_categories: int) -> torch.Tensor:
        return torch.tensor(self.categories, dtype=torch.float).view(-1, num_categories)

    def severity_targets(self) -> torch.Tensor | None:
        return None if self.severity is None else torch.tensor(self.severity, dtype=torch.long)


def tokenized_items(
    items: Sequence[QAItem],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    taxonomy: Taxonomy = PKU_SAFERLHF,
) -> TokenizedItems:
    """Tokenize ``items``, labelled in ``taxonomy``'s category order (and severity if it has it)."""
    encoded = encode_conversations(
        tokenizer, [i.prompt for i in items], [i.response for i in items], max_length
    )
    return TokenizedItems(
        input_ids=encoded.examples,
        categories=[[float(name in i.categories) for name in taxonomy.categories] for i in items],
        severity=[i.severity for i in items] if taxonomy.has_severity else None,
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


# -- class balance: (category targets (N, C), severity targets (N,) or None)
#    -> (category pos_weight, severity weight), for saferlhf.losses.moderation_loss -------------


def no_balance(
    category_targets: torch.Tensor, severity_targets: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return None, None


def balanced_weights(
    category_targets: torch.Tensor, severity_targets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positive weight ``neg_c / pos_c`` per category, clipped to ``[0, MAX_POS_WEIGHT]``, and
    inverse-frequency severity weights ``N / (4 · count_k)`` (scikit-learn's "balanced"; None
    without severity)."""
    positives = category_targets.float().sum(dim=0)  # (C,)
    negatives = len(category_targets) - positives
    pos_weight = (negatives / positives.clamp(min=1)).clamp(max=MAX_POS_WEIGHT)
    if severity_targets is None:
        return pos_weight, None
    counts = torch.bincount(severity_targets, minlength=NUM_SEVERITIES).float()  # (4,)
    severity_weight = len(severity_targets) / (NUM_SEVERITIES * counts.clamp(min=1))
    return pos_weight, severity_weight


CLASS_BALANCE: dict[str, Callable] = {"none": no_balance, "balanced": balanced_weights}


class ItemCollator:
    """Right-pads a batch of items (the backbone reads the last non-pad token), or with
    ``pack_length`` packs them into rows of that many tokens
    (:func:`~saferlhf.data.collate.pack_sequences`; ``ends`` then says where each one ends)."""

    def __init__(self, pad_token_id: int, pack_length: int | None = None):
        self.pad_token_id, self.pack_length = pad_token_id, pack_length

    def __call__(self, examples: Sequence[tuple[dict, float]]) -> dict[str, torch.Tensor]:
        batch = [item for item, _ in examples]
        sequences = [b["input_ids"] for b in batch]
        collated = sequence_layout(sequences, self.pad_token_id, self.pack_length) | {
            "categories": torch.tensor([b["categories"] for b in batch]),  # (B, C)
            "is_safe": torch.tensor([float(b["is_safe"]) for b in batch]),  # (B,)
            "weight": torch.tensor([weight for _, weight in examples]),  # (B,)
        }
        if "severity" in batch[0]:
            collated["severity"] = torch.tensor([b["severity"] for b in batch])  # (B,)
        return collated
