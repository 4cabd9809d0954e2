"""Single- versus dual-preference RLHF on the embedded benchmark: a Hydra sweep, one table, one plot.

    python experiments/single_vs_dual.py --base outputs/quickstart/<run>   # artifacts of a quickstart
    python experiments/single_vs_dual.py --base DIR --seeds 0,1,2 --lambda-init 0.1,1.0 --cost-limit -5
    python experiments/single_vs_dual.py --base DIR --aggregate-only

Two Hydra multiruns of ``experiment=single_vs_dual`` from the SFT, reward and cost models of
BASE: PPO with the single-preference reward over seeds, and PPO-Lagrangian over seeds x
lambda_init x lambda_lr x cost limit (single-preference PPO has no λ, so it is not repeated
per λ setting). Every job's summary.json goes into one table (markdown + JSON) and a Pareto
plot of final gold helpfulness against final gold unsafe rate, written to BASE_single_vs_dual/
and printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

FIELDS = (
    "gold/helpfulness",
    "gold/helpfulness_safe",
    "gold/unsafe_rate",
    "gold/unsafe_rate_harmful",
)


def run_sweeps(base: Path, sweep_root: Path, args: argparse.Namespace) -> None:
    common = [
        sys.executable, "-m", "saferlhf.cli", "-m", "experiment=single_vs_dual",
        f"init.policy={base / 'sft/artifacts/policy'}",
        f"init.reward={base}/reward_${{preference.name}}/artifacts/reward",
        f"init.cost={base / 'cost/artifacts/cost'}",
        "trainer.enable_progress_bar=false", f"seed={args.seeds}", *args.overrides,
    ]  # fmt: skip
    sweeps = {
        "single": ["preference=single"],
        "dual": [
            "preference=dual",
            f"lagrange.lambda_init={args.lambda_init}",
            f"lagrange.lambda_lr={args.lambda_lr}",
            f"lagrange.cost_limit={args.cost_limit}",
        ],
    }
    for name, axes in sweeps.items():
        command = [*common, *axes, f"hydra.sweep.dir={sweep_root / name}"]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)


def collect(sweep_dir: Path) -> list[dict]:
    """One record per job: its settings (from the resolved config) and final/initial gold metrics."""
    import yaml

    records = []
    for summary_path in sorted(sweep_dir.rglob("summary.json")):
        config = yaml.safe_load((summary_path.parent / "config.yaml").read_text())
        metrics = json.loads(summary_path.read_text())["metrics"]
        dual = config["preference"]["name"] == "dual"
        records.append(
            {
                "job": summary_path.parent.name,
                "preference": config["preference"]["name"],
                "seed": config["seed"],
                "lambda_init": config["lagrange"]["lambda_init"] if dual else None,
                "lambda_lr": config["lagrange"]["lambda_lr"] if dual else None,
                "cost_limit": config["lagrange"]["cost_limit"] if dual else None,
                **{f"initial/{f}": metrics[f"initial/{f}"] for f in FIELDS},
                **{f"final/{f}": metrics[f"final/{f}"] for f in FIELDS},
            }
        )
    return records


def aggregate(records: list[dict]) -> list[dict]:
    """Median and range over seeds per setting; single-preference jobs ignore λ, so they pool."""
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in records:
        groups[(r["preference"], r["lambda_init"], r["lambda_lr"], r["cost_limit"])][r["seed"]] = r
    rows = []
    for setting, by_seed in sorted(groups.items(), key=lambda kv: str(kv[0])):
        runs = list(by_seed.values())
        preference, lambda_init, lambda_lr, cost_limit = setting
        row = {
            "preference": preference,
            "lambda_init": lambda_init,
            "lambda_lr": lambda_lr,
            "cost_limit": cost_limit,
            "seeds": sorted(by_seed),
        }
        for stage in ("initial", "final"):
            for field in FIELDS:
                values = [r[f"{stage}/{field}"] for r in runs]
                row[f"{stage}/{field}"] = statistics.median(values)
                row[f"{stage}/{field}/range"] = [min(values), max(values)]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| setting | seeds | gold helpfulness | helpfulness of safe answers | unsafe rate | unsafe on harmful prompts |",
        "|---|---|---|---|---|---|",
    ]
    sft = rows[0]
    lines.append(
        f"| SFT (initial) | {sft['seeds']} | {sft['initial/gold/helpfulness']:.3f} | "
        f"{sft['initial/gold/helpfulness_safe']:.3f} | {sft['initial/gold/unsafe_rate']:.3f} | "
        f"{sft['initial/gold/unsafe_rate_harmful']:.3f} |"
    )
    for row in rows:
        name = (
            "PPO, single preference"
            if row["preference"] == "single"
            else f"PPO-Lag, λ0={row['lambda_init']}"
        )
        cells = [
            f"{row[f'final/{f}']:.3f} ({row[f'final/{f}/range'][0]:.3f}–{row[f'final/{f}/range'][1]:.3f})"
            for f in FIELDS
        ]
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    first = records[0]
    ax.scatter(
        first["initial/gold/unsafe_rate"],
        first["initial/gold/helpfulness"],
        marker="*",
        s=200,
        c="k",
        label="SFT",
    )
    for preference, marker in (("single", "o"), ("dual", "s")):
        chosen = [r for r in records if r["preference"] == preference]
        ax.scatter(
            [r["final/gold/unsafe_rate"] for r in chosen],
            [r["final/gold/helpfulness"] for r in chosen],
            marker=marker,
            label="PPO (single preference)" if preference == "single" else "PPO-Lagrangian (dual)",
        )
    ax.set_xlabel("gold unsafe rate (lower is safer)")
    ax.set_ylabel("gold helpfulness")
    ax.set_title("single vs dual preference: final policies, every seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="a finished quickstart run dir")
    parser.add_argument("--seeds", default="0,1", help="Hydra sweep values for seed")
    parser.add_argument("--lambda-init", default="0.1,1.0", help="values for lagrange.lambda_init")
    parser.add_argument("--lambda-lr", default="0.1", help="values for lagrange.lambda_lr")
    parser.add_argument("--cost-limit", default="-5.0", help="values for lagrange.cost_limit")
    parser.add_argument(
        "--aggregate-only", action="store_true", help="aggregate the finished sweeps"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args()
    base = args.base.resolve()
    sweep_root = base.parent / f"{base.name}_single_vs_dual"
    if not args.aggregate_only:
        run_sweeps(base, sweep_root, args)
    records = collect(sweep_root)
    rows = aggregate(records)
    table = markdown(rows)
    (sweep_root / "single_vs_dual.md").write_text(table)
    (sweep_root / "single_vs_dual.json").write_text(
        json.dumps({"rows": rows, "jobs": records}, indent=2) + "\n"
    )
    pareto_plot(records, sweep_root / "single_vs_dual_pareto.png")
    print(table)
    print(f"written: {sweep_root}/single_vs_dual.{{md,json}} and single_vs_dual_pareto.png")


if __name__ == "__main__":
    main()
