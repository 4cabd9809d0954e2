"""The generator: hub-schema preference rows from a "policy mixture" like the Alpaca models the
paper starts from, labelled by the oracle.

Labels (:func:`generate_benchmark`): the oracle scores both responses of a pair; ``better`` is the
more helpful one, ``safer`` the less harmful one (lower severity, then fewer categories; a safe
response is always the safer of a pair with an unsafe one, noise or not; of two safe answers to a
harmful prompt the one with more refusals and redirects; of two safe answers to a benign prompt
either), each flipped with probability ``label_noise``; ties go to a coin. The single-preference
label (:func:`single_preference_rows`) is one annotator who trades helpfulness against a harm
penalty per severity tier, an option (``data.benchmark.single_harm_penalty``).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from saferlhf.data.benchmark.grammar import (
    BENIGN_GRAMMAR,
    CLOSERS,
    HARM_GRAMMAR,
    OPENERS,
    PROMPT_TEMPLATES,
    REDIRECT,
    REFUSAL,
    REFUSALS,
    TOPICS,
    Topic,
    render,
)
from saferlhf.data.benchmark.oracle import GoldScore, Oracle, harm_category_dict

BENCHMARK_SOURCE = "saferlhf-benchmark"

MAX_RESPONSE_WORDS = 40  # optional filler is dropped rather than exceed this


Behaviour = Callable[[random.Random, Topic], list[str]]


def _comply(severity: int) -> Behaviour:
    def sample(rng: random.Random, topic: Topic) -> list[str]:
        templates = HARM_GRAMMAR[topic.category].comply
        # One sentence of the behaviour's severity, plus up to two of the same or lower tiers.
        first = rng.choice([text for tier, text, _ in templates if tier == severity])
        others = [text for tier, text, _ in templates if tier <= severity and text != first]
        steps = [first, *rng.sample(others, rng.randint(0, min(2, len(others))))]
        rng.shuffle(steps)
        sentences = [template.format(thing=topic.thing) for template in steps]
        return _with_filler(rng, sentences, opener=0.5, closer=0.3)

    return sample


def _redirect(rng: random.Random, topic: Topic) -> list[str]:
    redirects = rng.sample(HARM_GRAMMAR[topic.category].redirects, rng.randint(1, 2))
    return _with_filler(rng, redirects, opener=0.0, closer=0.3)


def _refuse_redirect(rng: random.Random, topic: Topic) -> list[str]:
    return [rng.choice(REFUSALS), *_redirect(rng, topic)]


def _refuse(rng: random.Random, topic: Topic) -> list[str]:
    return [rng.choice(REFUSALS)]


def _filler(rng: random.Random, topic: Topic) -> list[str]:
    return [rng.choice(OPENERS), rng.choice(CLOSERS)]


def _help(min_steps: int, max_steps: int) -> Behaviour:
    def sample(rng: random.Random, topic: Topic) -> list[str]:
        steps = rng.sample(BENIGN_GRAMMAR[topic.name][1], rng.randint(min_steps, max_steps))
        return _with_filler(rng, steps, opener=0.4, closer=0.4)

    return sample


def _off_topic(rng: random.Random, topic: Topic) -> list[str]:
    other = rng.choice([name for name in BENIGN_GRAMMAR if name != topic.name])
    steps = rng.sample(BENIGN_GRAMMAR[other][1], rng.randint(1, 3))
    return _with_filler(rng, steps, opener=0.4, closer=0.0)


def _with_filler(
    rng: random.Random, sentences: list[str], opener: float, closer: float
) -> list[str]:
    result = list(sentences)
    if rng.random() < opener:
        result.insert(0, rng.choice(OPENERS))
    if rng.random() < closer:
        result.append(rng.choice(CLOSERS))
    # Filler adds nothing: drop it rather than exceed the length budget.
    return result if _word_count(result) <= MAX_RESPONSE_WORDS else sentences


def _word_count(sentences: Sequence[str]) -> int:
    return len(render(sentences).split())  # the " ." after each sentence counts as a word


# (name, behaviour, weight). Weights follow the paper's picture of a base model: it complies
# with harmful requests about half the time, and sometimes refuses harmless ones.
HARMFUL_POLICY: tuple[tuple[str, Behaviour, float], ...] = (
    ("comply-minor", _comply(1), 0.18),
    ("comply-moderate", _comply(2), 0.16),
    ("comply-severe", _comply(3), 0.12),
    ("redirect", _redirect, 0.16),
    ("refuse-redirect", _refuse_redirect, 0.16),
    ("refuse", _refuse, 0.17),
    ("filler", _filler, 0.05),
)
BENIGN_POLICY: tuple[tuple[str, Behaviour, float], ...] = (
    ("help", _help(2, 4), 0.45),
    ("partial", _help(1, 1), 0.20),
    ("refuse", _refuse, 0.12),
    ("off-topic", _off_topic, 0.15),
    ("filler", _filler, 0.08),
)


def _sample_response(rng: random.Random, topic: Topic) -> tuple[str, str]:
    """(source, text) of one response drawn from the policy mixture for ``topic``."""
    policy = HARMFUL_POLICY if topic.is_harmful else BENIGN_POLICY
    name, behaviour, _ = rng.choices(policy, weights=[weight for _, _, weight in policy])[0]
    return f"{BENCHMARK_SOURCE}/{name}", render(behaviour(rng, topic))


def _sample_pair(rng: random.Random, topic: Topic) -> tuple[tuple[str, str], tuple[str, str]]:
    first = _sample_response(rng, topic)
    second = _sample_response(rng, topic)
    while second[1] == first[1]:  # a pair of identical texts carries no preference
        second = _sample_response(rng, topic)
    return first, second


def _split_prompts(seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per topic, a quarter of its prompts go to test, so no prompt is shared across splits."""
    rng = random.Random(f"{seed}/split")
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for topic in TOPICS:
        prompts = [
            template.format(task=task) for task in topic.tasks for template in PROMPT_TEMPLATES
        ]
        rng.shuffle(prompts)
        cut = len(prompts) // 4
        test[topic.name], train[topic.name] = prompts[:cut], prompts[cut:]
    return train, test


def _sample_topic(rng: random.Random, benign_fraction: float) -> Topic:
    harmful = rng.random() >= benign_fraction
    return rng.choice([topic for topic in TOPICS if topic.is_harmful == harmful])


def _flip(rng: random.Random, choice: int, label_noise: float) -> int:
    return 1 - choice if rng.random() < label_noise else choice


def _prefer_lower(rng: random.Random, key_0: Any, key_1: Any) -> int:
    """Index of the lower key; ties broken at random."""
    if key_0 == key_1:
        return rng.randrange(2)
    return 0 if key_0 < key_1 else 1


def _safety_moves(oracle: Oracle, response: str) -> int:
    return sum(
        move is not None and move.kind in (REFUSAL, REDIRECT) for _, move in oracle.parse(response)
    )


def _safer_id(
    rng: random.Random,
    oracle: Oracle,
    prompt: str,
    responses: Sequence[str],
    scores: Sequence[GoldScore],
    label_noise: float,
) -> int:
    if scores[0].is_safe != scores[1].is_safe:
        return 0 if scores[0].is_safe else 1  # invariant: noise never makes an unsafe one safer
    if not scores[0].is_safe:
        keys = [(score.severity, len(score.categories)) for score in scores]
    elif (topic := oracle.topic(prompt)) is not None and topic.is_harmful:
        # Both safe on a harmful request: the more cautious answer (refusals, redirects) is safer.
        keys = [-_safety_moves(oracle, response) for response in responses]
    else:
        keys = [0, 0]  # both safe on a harmless request: neither is riskier, so a coin decides
    return _flip(rng, _prefer_lower(rng, *keys), label_noise)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _preference_row(
    rng: random.Random,
    oracle: Oracle,
    prompt: str,
    pair: Sequence[tuple[str, str]],
    label_noise: float,
) -> dict[str, Any]:
    responses = [text for _, text in pair]
    scores = oracle.score_batch([prompt, prompt], responses)
    row: dict[str, Any] = {"prompt": prompt, "response_0": responses[0], "response_1": responses[1]}
    row["prompt_source"] = BENCHMARK_SOURCE
    row |= {f"response_{i}_source": source for i, (source, _) in enumerate(pair)}
    row |= {f"is_response_{i}_safe": score.is_safe for i, score in enumerate(scores)}
    row |= {
        f"response_{i}_harm_category": harm_category_dict(score) for i, score in enumerate(scores)
    }
    row |= {f"response_{i}_severity_level": score.severity for i, score in enumerate(scores)}
    better = _prefer_lower(rng, -scores[0].helpfulness, -scores[1].helpfulness)
    row["better_response_id"] = _flip(rng, better, label_noise)
    row["safer_response_id"] = _safer_id(rng, oracle, prompt, responses, scores, label_noise)
    row |= {f"response_{i}_sha256": _sha256(text) for i, text in enumerate(responses)}
    return row


def _generate_split(
    split: str,
    num_rows: int,
    prompts: Mapping[str, list[str]],
    seed: int,
    label_noise: float,
    benign_fraction: float,
) -> list[dict[str, Any]]:
    # Texts and labels use separate streams: changing label_noise relabels the same pairs.
    text_rng = random.Random(f"{seed}/{split}/text")
    label_rng = random.Random(f"{seed}/{split}/labels")
    oracle = Oracle()
    rows = []
    for _ in range(num_rows):
        topic = _sample_topic(text_rng, benign_fraction)
        prompt = text_rng.choice(prompts[topic.name])
        pair = _sample_pair(text_rng, topic)
        rows.append(_preference_row(label_rng, oracle, prompt, pair, label_noise))
    return rows


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def generate_benchmark(
    num_train: int, num_test: int, seed: int, label_noise: float, benign_fraction: float
) -> dict[str, list[dict[str, Any]]]:
    """Dual-preference rows in the PKU-SafeRLHF hub schema: ``{"train": [...], "test": [...]}``.

    Deterministic in its arguments. Train and test never share a prompt. ``label_noise`` is the
    probability that an annotator flips ``better`` or ``safer`` (never against the safe-is-safer
    invariant); ``benign_fraction`` the share of benign prompts, the rest spread evenly over the
    19 harm categories.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError(f"row counts must be >= 0, got num_train={num_train}, num_test={num_test}")
    _check_fraction("label_noise", label_noise)
    _check_fraction("benign_fraction", benign_fraction)
    train_prompts, test_prompts = _split_prompts(seed)
    return {
        "train": _generate_split(
            "train", num_train, train_prompts, seed, label_noise, benign_fraction
        ),
        "test": _generate_split("test", num_test, test_prompts, seed, label_noise, benign_fraction),
    }


def check_harm_penalty(harm_penalty: Sequence[float]) -> None:
    """A one-dimensional annotator's harm penalty: one finite, non-negative value per severity
    tier 0-3, never smaller for a more severe tier."""
    values = list(harm_penalty)
    if (
        len(values) != 4
        or not all(math.isfinite(v) and v >= 0 for v in values)
        or values != sorted(values)
    ):
        raise ValueError(
            "the single-preference harm penalty (data.benchmark.single_harm_penalty) needs 4 "
            f"finite, non-negative, non-decreasing values (severity 0, 1, 2, 3), got {values!r}"
        )


def single_preference_rows(
    rows: Sequence[Mapping[str, Any]],
    seed: int,
    label_noise: float,
    harm_penalty: Sequence[float],
) -> list[dict[str, Any]]:
    """The single-dimension rows for the same pairs: one annotator trading help against harm.

    ``better_response_id`` maximises ``helpfulness - harm_penalty[severity]`` (gold, from the
    oracle), ties at random, flipped with probability ``label_noise``. What a penalty means:
    compliance at tier t is worth ``0.75 + 0.05·t`` (up to 0.10 more with extra sentences), the
    best safe answer to a harmful prompt (two redirects) 0.65 and a bare refusal 0.10. So the
    annotator's favourite answer to a harmful prompt is unsafe when ``harm_penalty[t] <
    0.10 + 0.05·t`` for some tier (0.20 + 0.05·t with extra sentences), and it prefers tier-t
    harm to a bare refusal when ``harm_penalty[t] < 0.65 + 0.05·t``.
    """
    _check_fraction("label_noise", label_noise)
    check_harm_penalty(harm_penalty)
    rng = random.Random(f"{seed}/single")
    oracle = Oracle()
    keys = (
        "prompt",
        "response_0",
        "response_1",
        "prompt_source",
        "response_0_source",
        "response_1_source",
    )
    result = []
    for row in rows:
        scores = oracle.score_batch([row["prompt"]] * 2, [row["response_0"], row["response_1"]])
        utility = [score.helpfulness - harm_penalty[score.severity] for score in scores]
        better = _prefer_lower(rng, -utility[0], -utility[1])
        single = {key: row[key] for key in keys}
        single["better_response_id"] = _flip(rng, better, label_noise)
        single["response_0_sha256"] = row["response_0_sha256"]
        single["response_1_sha256"] = row["response_1_sha256"]
        result.append(single)
    return result
