"""``saferlhf task=data_report``: load and validate the data, then describe it.

Prints row counts per split, the harm category × severity distribution of the responses (per
category alone for a taxonomy without severity levels, as BeaverTails') in the run's taxonomy and,
where both label sets exist for the same pairs (the embedded benchmark), how often the single
preference label agrees with ``better`` (helpfulness) and with ``safer`` (harmlessness), and how
often, of the pairs with one safe and one unsafe response, it prefers the unsafe one.
Also counts rows that repeat an earlier row of their split and test prompts that are also train
prompts. Writes ``data_report.json`` and ``data_report.png`` into the run dir.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from saferlhf.data import benchmark, schema
from saferlhf.data.sources import Repeats, SkippedRow, load_data
from saferlhf.data.views import QAItem, qa_items
from saferlhf.run import RunContext, TaskResult
from saferlhf.taxonomy import Taxonomy, taxonomy_from_config


def harm_distribution(items: list[QAItem], taxonomy: Taxonomy) -> dict[str, Any]:
    """Counts of responses by safety, severity and category × severity (``taxonomy``'s
    categories, in its order); by category alone when the taxonomy has no severity levels."""
    by_category = {name: Counter() for name in taxonomy.categories}
    for item in items:
        for name in item.categories:
            by_category[name][item.severity] += 1
    distribution: dict[str, Any] = {
        "responses": len(items),
        "unsafe": sum(not item.is_safe for item in items),
    }
    if not taxonomy.has_severity:
        distribution["category"] = {name: counts.total() for name, counts in by_category.items()}
        return distribution
    distribution["severity"] = {
        level: sum(item.severity == level for item in items) for level in schema.SEVERITY_LEVELS
    }
    distribution["category_severity"] = {
        name: {level: counts[level] for level in schema.SEVERITY_LEVELS if level > 0}
        for name, counts in by_category.items()
    }
    return distribution


def label_agreement(dual_rows: list[dict], single_rows: list[dict]) -> dict[str, float]:
    """Share of pairs where the single label picks the same response as better / as safer, and,
    of the pairs with one safe and one unsafe response, the share where it prefers the unsafe
    one (NaN when there are none)."""
    pairs = list(zip(dual_rows, single_rows, strict=True))
    agree_better = sum(d["better_response_id"] == s["better_response_id"] for d, s in pairs)
    agree_safer = sum(d["safer_response_id"] == s["better_response_id"] for d, s in pairs)
    mixed = [(d, s) for d, s in pairs if d["is_response_0_safe"] != d["is_response_1_safe"]]
    prefers_unsafe = sum(not d[f"is_response_{s['better_response_id']}_safe"] for d, s in mixed)
    return {
        "single_agrees_better": agree_better / len(pairs),
        "single_agrees_safer": agree_safer / len(pairs),
        "single_prefers_unsafe": prefers_unsafe / len(mixed) if mixed else float("nan"),
    }


def _benchmark_agreement(data_cfg) -> dict[str, dict[str, float]]:
    b = data_cfg.benchmark
    dual = benchmark.generate_benchmark(
        b.num_train, b.num_test, b.seed, b.label_noise, b.benign_fraction
    )
    return {
        split: label_agreement(
            rows,
            benchmark.single_preference_rows(
                rows, seed=b.seed, label_noise=b.label_noise, harm_penalty=b.single_harm_penalty
            ),
        )
        for split, rows in dual.items()
    }


def plot_category_severity(distribution: dict[str, Any], path, title: str) -> None:
    """Responses per category, stacked by severity when the distribution has severity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    if "category_severity" in distribution:
        names = list(distribution["category_severity"])
        left = [0] * len(names)
        for level in (1, 2, 3):
            counts = [distribution["category_severity"][name][level] for name in names]
            ax.barh(names, counts, left=left, label=f"{level} {schema.SEVERITY_LEVELS[level]}")
            left = [a + b for a, b in zip(left, counts, strict=True)]
        ax.legend(title="severity")
    else:
        ax.barh(list(distribution["category"]), list(distribution["category"].values()))
    ax.invert_yaxis()  # the taxonomy's order from the top
    ax.set_xlabel("responses")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def data_report(run: RunContext) -> TaskResult:
    cfg = run.cfg
    taxonomy = taxonomy_from_config(cfg.taxonomy)
    loaded = load_data(cfg.data, taxonomy)
    skipped_file = loaded.write_skipped(run.run_dir)
    report: dict[str, Any] = {"kind": loaded.kind, "splits": {}}
    for split, ds in loaded.splits.items():
        entry: dict[str, Any] = {"rows": len(ds)}
        if loaded.kind != schema.SINGLE:
            entry["harm"] = harm_distribution(qa_items(ds), taxonomy)
        report["splits"][split] = entry
    if cfg.data.source == "benchmark" and loaded.kind != schema.QA:
        for split, agreement in _benchmark_agreement(cfg.data).items():
            report["splits"][split]["label_agreement"] = agreement
    report["skipped_rows"] = len(loaded.skipped)
    repeats = loaded.repeats
    report["repeats"] = repeats.to_dict()

    metrics: dict[str, float] = {
        "data/train_rows": len(loaded.splits["train"]),
        "data/test_rows": len(loaded.splits["test"]),
        "data/skipped_rows": len(loaded.skipped),
        "data/shared_prompts": repeats.shared_prompts,
    }
    for split, count in repeats.duplicate_rows.items():
        metrics[f"data/{split}/duplicate_rows"] = count
    for split, entry in report["splits"].items():
        if "harm" in entry:
            metrics[f"data/{split}/unsafe_fraction"] = entry["harm"]["unsafe"] / max(
                entry["harm"]["responses"], 1
            )
        for name, value in entry.get("label_agreement", {}).items():
            metrics[f"data/{split}/{name}"] = value
    run.log_metrics(metrics)

    artifacts = {"data_report": str(run.run_dir / "data_report.json")}
    (run.run_dir / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if cfg.task.plot and "harm" in report["splits"]["train"]:
        png = run.run_dir / "data_report.png"
        plot_category_severity(
            report["splits"]["train"]["harm"], png, f"{cfg.data.source}: train responses"
        )
        artifacts["data_report_plot"] = str(png)
    if skipped_file:
        artifacts["skipped_rows"] = str(skipped_file)
    _print_report(report, loaded.skipped, skipped_file)
    _print_repeats(repeats)
    return TaskResult(metrics, artifacts)


SKIPPED_SHOWN = 20  # the rest are in skipped_rows.jsonl


def _print_report(report: dict[str, Any], skipped: list[SkippedRow], skipped_file) -> None:
    console = Console()
    table = Table(title=f"data report ({report['kind']} rows)")
    for column in (
        "split",
        "rows",
        "responses",
        "unsafe",
        "sev 1/2/3",
        "single=better",
        "single=safer",
        "single prefers unsafe",
    ):
        table.add_column(column)
    for split, entry in report["splits"].items():
        harm = entry.get("harm")
        agreement = entry.get("label_agreement", {})
        table.add_row(
            split,
            str(entry["rows"]),
            str(harm["responses"]) if harm else "-",
            str(harm["unsafe"]) if harm else "-",
            "/".join(str(harm["severity"][level]) for level in (1, 2, 3))
            if harm and "severity" in harm
            else "-",
            f"{agreement['single_agrees_better']:.3f}" if agreement else "-",
            f"{agreement['single_agrees_safer']:.3f}" if agreement else "-",
            f"{agreement['single_prefers_unsafe']:.3f}" if agreement else "-",
        )
    console.print(table)
    harm = report["splits"]["train"].get("harm")
    if harm and "category_severity" in harm:
        categories = Table(title="train responses by harm category and severity")
        for column in ("category", "minor", "moderate", "severe"):
            categories.add_column(column)
        for name, counts in harm["category_severity"].items():
            categories.add_row(name, *(str(counts[level]) for level in (1, 2, 3)))
        console.print(categories)
    elif harm:
        categories = Table(title="train responses by harm category")
        for column in ("category", "responses"):
            categories.add_column(column)
        for name, count in harm["category"].items():
            categories.add_row(name, str(count))
        console.print(categories)
    if skipped:
        console.print(
            f"[yellow]skipped {len(skipped)} invalid rows (data.on_bad_row=skip):[/yellow]"
        )
        for row in skipped[:SKIPPED_SHOWN]:
            console.print(
                f"  {row.message()}",
                markup=False,
                soft_wrap=True,
            )
        console.print(
            f"every skipped row with its reason: {skipped_file}", markup=False, soft_wrap=True
        )


def _print_repeats(repeats: Repeats) -> None:
    console = Console()
    for split, count in repeats.duplicate_rows.items():
        if count:
            examples = "; ".join(repeats.duplicate_examples[split])
            console.print(
                f"{split}: {count} rows repeat an earlier row (e.g. {examples})",
                markup=False,
                soft_wrap=True,
            )
    if repeats.shared_prompts:
        console.print(
            f"{repeats.shared_prompts} test prompts ({repeats.shared_prompt_test_rows} test rows) "
            f"are also train prompts (e.g. {'; '.join(repeats.shared_prompt_examples)})",
            markup=False,
            soft_wrap=True,
        )
