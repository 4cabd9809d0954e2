"""The embedded benchmark: a seeded, offline stand-in for PKU-SafeRLHF, and its oracle.

No hub is reachable offline, so the default data is generated in the exact hub schema from a
small grammar that tiny models can learn on a CPU; because every response is built from known
sentences, a deterministic oracle can score any text, including what a policy generates.

- ``grammar``: prompt templates, phrase tables and topics (what the rows are made of);
- ``oracle``: gold helpfulness and harm for any (prompt, response) text;
- ``generator``: the policy mixture and the dual- and single-preference rows it labels.
"""

from saferlhf.data.benchmark.generator import (
    BENCHMARK_SOURCE,
    generate_benchmark,
    single_preference_rows,
)
from saferlhf.data.benchmark.grammar import (
    BENIGN_GRAMMAR,
    HARM_GRAMMAR,
    PHRASES,
    PROMPT_TEMPLATES,
    TOPICS,
    render,
)
from saferlhf.data.benchmark.oracle import (
    SAFE,
    UNREADABLE,
    UNSAFE,
    GoldScore,
    Oracle,
    harm_category_dict,
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
