"""``python -m saferlhf.data.benchmark``: generate the default-sized benchmark and print its
statistics (time, vocabulary, how often ``better`` prefers harm, severities and categories)."""

import time
from collections import Counter

from saferlhf.data.benchmark.generator import generate_benchmark, single_preference_rows
from saferlhf.data.benchmark.grammar import PHRASES
from saferlhf.data.schema import HARM_CATEGORIES

start = time.perf_counter()
splits = generate_benchmark(
    num_train=4000, num_test=500, seed=0, label_noise=0.1, benign_fraction=0.35
)
single = single_preference_rows(
    splits["train"], seed=0, label_noise=0.1, harm_penalty=(0.0, 0.3, 0.45, 0.6)
)
seconds = time.perf_counter() - start
train = splits["train"]
severities = Counter(row[f"response_{i}_severity_level"] for row in train for i in (0, 1))
categories = Counter(
    name
    for row in train
    for i in (0, 1)
    for name, flag in row[f"response_{i}_harm_category"].items()
    if flag
)
words = {
    word
    for split in splits.values()
    for row in split
    for key in ("prompt", "response_0", "response_1")
    for word in row[key].split()
}
print(
    f"train {len(train)}, test {len(splits['test'])}, single {len(single)} rows in {seconds:.2f} s"
)
print(f"vocabulary: {len(words)} distinct words; phrases: {len(PHRASES)}")
mixed = [row for row in train if row["is_response_0_safe"] != row["is_response_1_safe"]]
prefers_unsafe = sum(not row[f"is_response_{row['better_response_id']}_safe"] for row in mixed)
print(
    f"better prefers the unsafe response in {prefers_unsafe / len(mixed):.3f} of {len(mixed)} mixed pairs"
)
print("severity (responses):", dict(sorted(severities.items())))
for name in HARM_CATEGORIES:
    print(f"  {categories[name]:5d}  {name}")
