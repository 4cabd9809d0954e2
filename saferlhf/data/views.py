"""Training views over validated rows: the pairs and items each stage learns from.

Rows are hub-schema mappings (a ``datasets.Dataset`` or a list of dicts). No tokenization here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Rows = Iterable[Mapping[str, Any]]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with the preferred (``chosen``) and the other (``rejected``) response."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class SafetyPair:
    """A prompt with its safer and unsafer response and each one's safety sign.

    Signs follow Safe RLHF's cost model: ``+1`` for an unsafe response, ``-1`` for a safe one.
    """

    prompt: str
    safer: str
    unsafer: str
    safer_sign: int
    unsafer_sign: int


@dataclass(frozen=True)
class QAItem:
    """One response with its safety annotation (PKU-SafeRLHF-QA or BeaverTails rows)."""

    prompt: str
    response: str
    is_safe: bool
    categories: tuple[str, ...]  # the names flagged true, in the row's (the taxonomy's) order
    severity: int | None  # None for rows without severity levels (BeaverTails)

    def to_row(self, categories: Sequence[str]) -> dict[str, Any]:
        """The PKU-SafeRLHF-QA row, flagging each of ``categories`` (the taxonomy's names)."""
        return {
            "prompt": self.prompt,
            "response": self.response,
            "is_safe": self.is_safe,
            "harm_category": {name: name in self.categories for name in categories},
            "severity_level": self.severity,
        }


def safety_sign(is_safe: bool) -> int:
    return -1 if is_safe else 1


def preference_pairs(rows: Rows) -> list[PreferencePair]:
    """Pairs ordered by ``better_response_id``.

    On dual-preference rows this is the helpfulness preference; on single-dimension rows it is
    the one label that trades helpfulness against harmlessness (single-preference pairs).
    """
    pairs = []
    for row in rows:
        better = row["better_response_id"]
        pairs.append(
            PreferencePair(row["prompt"], row[f"response_{better}"], row[f"response_{1 - better}"])
        )
    return pairs


def safety_pairs(rows: Rows) -> list[SafetyPair]:
    """Pairs ordered by ``safer_response_id``, with both responses' safety signs."""
    pairs = []
    for row in rows:
        safer = row["safer_response_id"]
        unsafer = 1 - safer
        pairs.append(
            SafetyPair(
                prompt=row["prompt"],
                safer=row[f"response_{safer}"],
                unsafer=row[f"response_{unsafer}"],
                safer_sign=safety_sign(row[f"is_response_{safer}_safe"]),
                unsafer_sign=safety_sign(row[f"is_response_{unsafer}_safe"]),
            )
        )
    return pairs


def qa_key(prompt: str, response: str) -> str:
    """Identity of a (prompt, response) item: sha256 of the two texts."""
    return hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()


def _categories(flags: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(name for name, flag in flags.items() if flag)


def qa_items(rows: Rows) -> list[QAItem]:
    """QA items from preference rows (two per row), QA rows or BeaverTails rows (no severity),
    deduplicated by :func:`qa_key`."""
    seen: set[str] = set()
    items = []
    for row in rows:
        if "category" in row:
            candidates = [(row["response"], row["is_safe"], row["category"], None)]
        elif "response" in row:
            candidates = [
                (row["response"], row["is_safe"], row["harm_category"], row["severity_level"])
            ]
        else:
            candidates = [
                (
                    row[f"response_{i}"],
                    row[f"is_response_{i}_safe"],
                    row[f"response_{i}_harm_category"],
                    row[f"response_{i}_severity_level"],
                )
                for i in (0, 1)
            ]
        for response, is_safe, flags, severity in candidates:
            key = qa_key(row["prompt"], response)
            if key not in seen:
                seen.add(key)
                items.append(QAItem(row["prompt"], response, is_safe, _categories(flags), severity))
    return items


def _distinct(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs without repeats (by :func:`qa_key`), in first-seen order."""
    seen: dict[str, tuple[str, str]] = {}
    for prompt, response in pairs:
        seen.setdefault(qa_key(prompt, response), (prompt, response))
    return list(seen.values())


def conversations(rows: Rows) -> list[tuple[str, str]]:
    """The distinct (prompt, response) pairs of any row kind (QA, dual or single preference), in
    first-seen order: what a language-modelling loss such as PPO's ptx learns from."""
    return _distinct(
        (row["prompt"], response)
        for row in rows
        for response in (
            [row["response"]] if "response" in row else [row["response_0"], row["response_1"]]
        )
    )


def preferred_conversations(rows: Rows) -> list[tuple[str, str]]:
    """The distinct (prompt, response) pairs of the responses the labels prefer, in first-seen
    order: of each row the better response (``better_response_id``), and of a dual row only if
    it is also safe, so that a row whose more helpful answer is harmful gives none. What PPO's
    ptx learns from with ``algo.ptx_data=preferred``."""
    return _distinct(
        (row["prompt"], row[f"response_{row['better_response_id']}"])
        for row in rows
        # single rows carry no safety labels
        if row.get(f"is_response_{row['better_response_id']}_safe", True)
    )


def prompts(rows: Rows) -> list[str]:
    """The distinct prompts, in first-seen order."""
    return list(dict.fromkeys(row["prompt"] for row in rows))
