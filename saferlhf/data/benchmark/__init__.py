"""The embedded benchmark: a seeded, offline stand-in for PKU-SafeRLHF, and its oracle."""

from saferlhf.data.benchmark.grammar import (
    BENCHMARK_SOURCE,
    BENIGN_GRAMMAR,
    HARM_GRAMMAR,
    PHRASES,
    PROMPT_TEMPLATES,
    SAFE,
    TOPICS,
    UNREADABLE,
    UNSAFE,
    GoldScore,
    Oracle,
    generate_benchmark,
    harm_category_dict,
    render,
    single_preference_rows,
)

__all__ = [
    "BENCHMARK_SOURCE",
    "BENIGN_GRAMMAR",
    "HARM_GRAMMAR",
    "PHRASES",
    "PROMPT_TEMPLATES",
    "SAFE",
    "TOPICS",
    "UNREADABLE",
    "UNSAFE",
    "GoldScore",
    "Oracle",
    "generate_benchmark",
    "harm_category_dict",
    "render",
    "single_preference_rows",
]
