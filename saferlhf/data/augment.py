"""Corrupted copies of responses: what a drifting policy writes, for score models to see.

A reward model trained only on well-formed answers has never seen the text a policy produces
once RL pushes it off the data: cut-off sentences, garbled words, stray fragments, repeats. It
may score such text anywhere, and PPO then climbs into it. :func:`corrupted_pairs` adds pairs
that rank a response above a corrupted copy of itself, so the reward model learns that
corruption costs helpfulness (as the benchmark's gold oracle charges it). No tokenization here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from saferlhf.data.views import PreferencePair


def _truncate(rng: random.Random, words: list[str], pool: Sequence[str]) -> list[str]:
    """Cut the response off before its end, as when sampling hits its token limit."""
    return words[: rng.randrange(len(words))]


def _garble_word(rng: random.Random, words: list[str], pool: Sequence[str]) -> list[str]:
    """Break one word apart or glue two together, as sub-word sampling does."""
    i = rng.randrange(len(words))
    word = words[i]
    cut = rng.randrange(1, len(word)) if len(word) > 1 else 1
    glued = word[:cut] + rng.choice(pool)[rng.randrange(2) :]
    return [*words[:i], glued, *words[i + 1 :]]


def _splice(rng: random.Random, words: list[str], pool: Sequence[str]) -> list[str]:
    """Replace a run of words with words from elsewhere: a sentence that changes course."""
    start = rng.randrange(len(words))
    end = min(len(words), start + rng.randint(1, 4))
    return [*words[:start], *rng.sample(list(pool), min(len(pool), end - start)), *words[end:]]


def _repeat(rng: random.Random, words: list[str], pool: Sequence[str]) -> list[str]:
    """Say a run of words again, as a looping sampler does."""
    start = rng.randrange(len(words))
    end = min(len(words), start + rng.randint(2, 6))
    return [*words[:end], *words[start:end], *words[end:]]


CORRUPTIONS: tuple[Callable[[random.Random, list[str], Sequence[str]], list[str]], ...] = (
    _truncate,
    _garble_word,
    _splice,
    _repeat,
)


def corrupt(text: str, rng: random.Random, pool: Sequence[str]) -> str:
    """A copy of ``text`` with one or two corruptions drawn from :data:`CORRUPTIONS`; ``pool``
    is the words to splice in. Always differs from ``text`` when ``text`` has a word."""
    words = text.split()
    if not words:
        return rng.choice(pool)
    corrupted = words
    while corrupted == words:
        for _ in range(rng.randint(1, 2)):
            if corrupted:
                corrupted = rng.choice(CORRUPTIONS)(rng, corrupted, pool)
    return " ".join(corrupted)


def corrupted_pairs(
    pairs: Sequence[PreferencePair], fraction: float, seed: int
) -> list[PreferencePair]:
    """``round(fraction · len(pairs))`` extra pairs, each a response of a random pair (chosen or
    rejected alike) preferred to a corrupted copy of itself. Deterministic in ``seed``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"the corrupted-pair fraction (task.corrupted_pairs) must be in [0, 1], got {fraction!r}"
        )
    rng = random.Random(f"{seed}/corrupted-pairs")
    pool = sorted({word for pair in pairs for word in (pair.chosen + " " + pair.rejected).split()})
    extra = []
    for _ in range(round(fraction * len(pairs))):
        pair = rng.choice(pairs)
        original = rng.choice((pair.chosen, pair.rejected))
        extra.append(PreferencePair(pair.prompt, original, corrupt(original, rng, pool)))
    return extra
