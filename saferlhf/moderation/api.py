"""The ``Moderator`` API: load a moderation model folder and judge (prompt, response) pairs.

A moderation model is a plain Hugging Face ``AutoModelForSequenceClassification`` folder with
23 outputs at the last token (``saferlhf task=moderation`` writes one to
``artifacts/moderation``):

- ``logits[:, :19]``: one multi-label logit per harm category, in ``HARM_CATEGORIES`` order;
- ``logits[:, 19:23]``: the severity head, 0 safe, 1 minor, 2 moderate, 3 severe.

Its ``config.json`` carries ``moderation = {"categories", "thresholds", "severity_levels",
"max_length"}``: the per-category probability thresholds chosen on held-out data, so the one
folder is all a client needs.

The flagging rule (:func:`flag`), for a tolerated severity ``max_severity`` (default 0):

- ``flagged`` when the predicted severity exceeds ``max_severity``;
- with ``max_severity == 0`` (tolerate nothing) also when any category is over its threshold.

So ``max_severity=1`` lets minor harm through and flags moderate or severe harm, judged by the
severity head alone; the categories over threshold are reported either way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from saferlhf.data.collate import pad_sequences, tokenize_conversations
from saferlhf.data.schema import HARM_CATEGORIES, SEVERITY_LEVELS

NUM_CATEGORIES = len(HARM_CATEGORIES)  # 19
NUM_SEVERITIES = len(SEVERITY_LEVELS)  # 4
NUM_LABELS = NUM_CATEGORIES + NUM_SEVERITIES  # 23


def split_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 23)`` logits -> category logits ``(N, 19)`` and severity logits ``(N, 4)``."""
    return logits[:, :NUM_CATEGORIES], logits[:, NUM_CATEGORIES:NUM_LABELS]


def over_threshold(category_probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Which categories are predicted: ``prob > threshold``, ``(N, 19)`` bool."""
    return category_probs > thresholds


def flag(
    category_probs: torch.Tensor,
    thresholds: torch.Tensor,
    severity: torch.Tensor,
    max_severity: int = 0,
) -> torch.Tensor:
    """The flagging rule (see the module docstring): ``(N,)`` bool.

    ``category_probs`` ``(N, 19)``, ``thresholds`` ``(19,)``, ``severity`` ``(N,)`` predicted
    levels. Flagged when ``severity > max_severity``, or, only for ``max_severity == 0``, when
    any category is over its threshold.
    """
    flagged = severity > max_severity
    if max_severity == 0:
        flagged = flagged | over_threshold(category_probs, thresholds).any(dim=-1)
    return flagged


@dataclass(frozen=True)
class Verdict:
    """The judgement of one response.

    ``categories`` maps each category over its threshold to its probability (card order);
    ``severity`` is the severity head's argmax (0 safe .. 3 severe); ``flagged`` follows
    :func:`flag` for the ``max_severity`` that :meth:`Moderator.moderate` was given.
    """

    flagged: bool
    severity: int
    categories: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class Moderator:
    """A loaded moderation model; :meth:`moderate` judges batches of (prompt, response)."""

    def __init__(self, model, tokenizer, thresholds: Sequence[float], max_length: int, device):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.thresholds = torch.tensor(list(thresholds), dtype=torch.float, device=self.device)
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | None = None) -> Moderator:
        """Load a folder written by ``saferlhf task=moderation`` (``artifacts/moderation``).

        ``device`` defaults to ``cuda`` when available, else ``cpu``.
        """
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory}: no config.json (expected a moderation model)")
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        spec = getattr(model.config, "moderation", None)
        if not spec or list(spec.get("categories", ())) != list(HARM_CATEGORIES):
            raise ValueError(
                f"{directory}/config.json has no 'moderation' entry with the 19 categories: "
                "not a moderation model (train one with `saferlhf task=moderation`)"
            )
        if model.config.num_labels != NUM_LABELS:
            raise ValueError(f"{directory}: expected {NUM_LABELS} outputs")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, tokenizer, spec["thresholds"], spec["max_length"], device)

    @torch.inference_mode()
    def predict(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Category probabilities ``(N, 19)`` and severity levels ``(N,)`` for one batch."""
        sequences = tokenize_conversations(self.tokenizer, prompts, responses, self.max_length)
        input_ids, attention_mask = pad_sequences(sequences, self.tokenizer.pad_token_id)
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        ).logits.float()  # (N, 23)
        category_logits, severity_logits = split_logits(logits)
        return category_logits.sigmoid(), severity_logits.argmax(dim=-1)

    def moderate(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        max_severity: int = 0,
        batch_size: int = 64,
    ) -> list[Verdict]:
        """One :class:`Verdict` per (prompt, response), computed ``batch_size`` at a time.

        ``max_severity`` is the highest severity tolerated (0..3); see :func:`flag`.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if max_severity not in SEVERITY_LEVELS:
            raise ValueError(f"max_severity={max_severity!r}: expected one of 0, 1, 2, 3")
        verdicts: list[Verdict] = []
        for start in range(0, len(prompts), batch_size):
            stop = start + batch_size
            probs, severity = self.predict(prompts[start:stop], responses[start:stop])
            flagged = flag(probs, self.thresholds, severity, max_severity)
            over = over_threshold(probs, self.thresholds)
            for row in range(len(probs)):
                categories = {
                    name: round(float(probs[row, c]), 6)
                    for c, name in enumerate(HARM_CATEGORIES)
                    if over[row, c]
                }
                verdicts.append(Verdict(bool(flagged[row]), int(severity[row]), categories))
        return verdicts
