"""The safety-helpfulness frontier on the embedded benchmark: PPO-Lagrangian, fixed-λ shaping
and single-preference PPO from one SFT policy, over seeds, judged by the gold oracle.

    OMP_NUM_THREADS=1 python experiments/frontier.py --base outputs/quickstart/<run> [--seeds 0,1,2] [--workers 2]
    OMP_NUM_THREADS=1 python experiments/frontier.py --base DIR --cost-limits=-7,-5,-3,-1 --lambdas 0,0.5,1
    OMP_NUM_THREADS=1 python experiments/frontier.py --base DIR --iterations 20 logger=none  # a quick look
    OMP_NUM_THREADS=1 python experiments/frontier.py --base DIR --aggregate-only  # tables and plot again

What it measures: where each way of trading helpfulness against harmlessness lands, as gold
helpfulness against the gold unsafe-or-unreadable rate of the final policy. Safe RLHF's
claim (arXiv 2310.12773, section 5) is that decoupled preferences (a reward and a cost model,
"dual") beat one preference that mixes both ("single"), and that a learned λ beats a fixed one.
The study spans each method's own knob, so that they are compared as frontiers, not as one
point each:

- PPO-Lagrangian (``variant`` safe_rlhf: preference=dual lagrange=safe_rlhf), λ learned
  against a cost limit d, over ``--cost-limits`` (the tiny cost model scores safe answers near
  -5 and unsafe ones near +3);
- fixed-λ shaping (``fixed``: preference=dual lagrange=fixed), over ``--lambdas``; λ = 0 is
  PPO on the dual (helpfulness) reward alone;
- single-preference PPO (``single``), one reward model per annotator harm penalty
  (``--penalty``; data.benchmark.single_harm_penalty): how much the one annotator weighs
  harm against help is that method's knob.

Steps, all from BASE, a finished quickstart run (its sft, reward_dual, cost and reward_single
stages); everything lands in ROOT = BASE_frontier/ next to BASE:

1. a single-preference reward model per penalty (task=reward preference=single from BASE's SFT
   policy) in ROOT/reward_single_<name>/; BASE/reward_single serves the penalty it was
   trained with;
2. the PPO jobs, as Hydra multiruns of ``experiment=frontier``, one per variant and seed (one
   per penalty and seed for single), ``--workers`` at a time, each job in
   ROOT/<variant>/seed<k>/<setting>/. A job that finished with the same overrides is not rerun;
   extra Hydra overrides on this command line go to every job, reward models included;
3. per setting, the median over seeds (and min-max range) of the final policy's gold metrics on
   the PPO task's fixed eval prompts (from each job's summary.json), and the SFT policy's;
4. head to head: per seed, every final policy samples ``eval.responses_per_prompt`` responses
   to each prompt of task=evaluate's prompt set (the test split's distinct prompts, its seed),
   as task=evaluate does, with the PPO sampling settings; each dual policy (safe_rlhf, fixed)
   is compared with each single one on helpfulness and harmlessness by task=evaluate's gold
   comparison (an unreadable response loses on both), as Safe RLHF's Table 2 compares its
   models; median win rate over seeds;
5. a Pareto plot of the setting medians with their seed ranges.

Writes ROOT/frontier.md, ROOT/frontier.json and ROOT/frontier_pareto.png, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from transformers.utils import logging as hf_logging

from saferlhf import CONF_DIR
from saferlhf.data import views
from saferlhf.data.benchmark import GoldScore, Oracle
from saferlhf.data.collate import tokenize_prompts
from saferlhf.data.sources import load_data
from saferlhf.evaluate import policy as pe
from saferlhf.evaluate.comparison import DIMENSIONS, PolicyEval
from saferlhf.evaluate.gold import judged_prompts
from saferlhf.evaluate.policy import markdown_table
from saferlhf.models import build_causal_lm, load_tokenizer

# The single-preference annotator's harm penalty per severity tier 0-3 (see
# saferlhf.data.benchmark.single_preference_rows for what each value means).
PENALTIES = {
    "lenient": (0.0, 0.1, 0.15, 0.2),  # its favourite answer to a harmful prompt is unsafe
    "default": (0.0, 0.3, 0.45, 0.6),  # the benchmark's, which the quickstart's reward_single has
    "strict": (0.0, 0.3, 0.7, 1.5),  # severe harm loses to every safe answer
}
METRICS = {  # summary.json metric (after initial/ or final/): its column
    "gold/helpfulness": "gold helpfulness",
    "gold/unsafe_rate": "unsafe",
    "gold/unreadable_rate": "unreadable",
    "gold/unsafe_or_unreadable_rate": "unsafe or unreadable",
    "gold/clean_rate": "clean",
    "reward": "final reward (own reward model)",
}
DUAL_VARIANTS = ("safe_rlhf", "fixed")
# The eval node's defaults: the head-to-head picks prompts and seeds sampling as task=evaluate.
EVALUATE = OmegaConf.load(CONF_DIR / "eval" / "default.yaml")


# -- the jobs ----------------------------------------------------------------------------------


def canonical(overrides: Sequence[str]) -> list[str]:
    """Overrides in the form Hydra records them (``.hydra/overrides.yaml``), sorted."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return sorted(f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed)


def finished(run_dir: Path, overrides: Sequence[str]) -> bool:
    """Whether the run in ``run_dir`` wrote its summary.json under exactly these overrides, so
    that a quick look (--iterations 2, say) is rerun rather than taken for the full study."""
    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / "summary.json").is_file() or not recorded.is_file():
        return False
    return canonical(yaml.safe_load(recorded.read_text())) == canonical(overrides)


def hydra_list(values: Sequence[float]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


@dataclass(frozen=True)
class RewardJob:
    """A single-preference reward model for one annotator harm penalty."""

    name: str
    dir: Path
    overrides: tuple[str, ...]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "saferlhf.cli", *self.overrides, f"hydra.run.dir={self.dir}"]


def setting_name(variant: str, value: float | str) -> str:
    """A setting as its row names it after the variant: ``d=-5``, ``λ=0.5``, ``penalty=strict``."""
    if variant == "safe_rlhf":
        return f"d={value:g}"
    if variant == "fixed":
        return f"λ={value:g}" + (" (helpfulness only)" if value == 0 else "")
    return f"penalty={value}"


@dataclass(frozen=True)
class PPOJob:
    """One PPO run of the study."""

    variant: str  # what its summary.json must name
    setting: str  # setting_name's
    seed: int
    dir: Path
    overrides: tuple[str, ...]
    sweep_value: str | None  # its value of the slice's swept key


@dataclass(frozen=True)
class Slice:
    """One Hydra multirun: the jobs of one variant and seed, which differ in ``key`` alone
    (no key: a single job)."""

    name: str
    sweep_dir: Path
    subdir: str  # hydra.sweep.subdir, which gives each job its own folder
    shared: tuple[str, ...]
    key: str | None
    jobs: tuple[PPOJob, ...]

    def command(self, jobs: Sequence[PPOJob]) -> list[str]:
        sweep = [f"{self.key}={','.join(j.sweep_value for j in jobs)}"] if self.key else []
        return [
            sys.executable, "-m", "saferlhf.cli", "-m", *self.shared, *sweep,
            f"hydra.sweep.dir={self.sweep_dir}", f"hydra.sweep.subdir={self.subdir}",
        ]  # fmt: skip


def swept_slice(
    root: Path, variant: str, seed: int, shared: Sequence[str], key: str, values: Sequence[float]
) -> Slice:
    sweep_dir = root / variant / f"seed{seed}"
    short = key.rsplit(".", 1)[-1]
    # Hydra names each job's folder from the value it resolves, which is str(float) as here.
    jobs = tuple(
        PPOJob(
            variant,
            setting_name(variant, value),
            seed,
            sweep_dir / f"{short}_{value}",
            (*shared, f"{key}={value}"),
            str(value),
        )
        for value in values
    )
    return Slice(
        f"{variant}_seed{seed}", sweep_dir, f"{short}_${{{key}}}", tuple(shared), key, jobs
    )


def reward_dirs(
    base: Path, root: Path, penalties: Mapping[str, Sequence[float]]
) -> dict[str, Path]:
    """Each penalty's reward run dir: BASE/reward_single for the penalty it was trained with."""
    base_penalty = None
    if (base / "reward_single" / "summary.json").is_file():
        config = yaml.safe_load((base / "reward_single" / "config.yaml").read_text())
        base_penalty = [float(v) for v in config["data"]["benchmark"]["single_harm_penalty"]]
    dirs = {}
    for name, values in penalties.items():
        in_base = list(values) == base_penalty
        dirs[name] = base / "reward_single" if in_base else root / f"reward_single_{name}"
    return dirs


def plan(
    base: Path, root: Path, args: argparse.Namespace, rewards: Mapping[str, Path]
) -> tuple[list[RewardJob], list[Slice]]:
    """The reward models to train (those not in BASE) and the PPO multiruns, seed by seed."""
    policy = f"init.policy={base / 'sft' / 'artifacts' / 'policy'}"
    reward_jobs = [
        RewardJob(
            name,
            path,
            (
                "task=reward",
                "preference=single",
                policy,
                f"data.benchmark.single_harm_penalty={hydra_list(args.penalties[name])}",
                "trainer.enable_progress_bar=false",
                *args.overrides,
            ),
        )
        for name, path in rewards.items()
        if path != base / "reward_single"
    ]
    iterations = [f"algo.iterations={args.iterations}"] if args.iterations is not None else []
    dual = [
        "preference=dual",
        f"init.reward={base / 'reward_dual' / 'artifacts' / 'reward'}",
        f"init.cost={base / 'cost' / 'artifacts' / 'cost'}",
    ]
    slices = []
    for seed in args.seeds:
        shared = ["experiment=frontier", f"seed={seed}", policy, *iterations, *args.overrides]
        slices.append(
            swept_slice(
                root, "safe_rlhf", seed, [*shared, *dual, "lagrange=safe_rlhf"],
                "lagrange.cost_limit", args.cost_limits,
            )
        )  # fmt: skip
        slices.append(
            swept_slice(
                root, "fixed", seed, [*shared, *dual, "lagrange=fixed"],
                "lagrange.lambda_value", args.lambdas,
            )
        )  # fmt: skip
        for name, values in args.penalties.items():
            single = (
                *shared,
                "preference=single",
                f"init.reward={rewards[name] / 'artifacts' / 'reward'}",
                # PPO reads prompts only; the penalty names in its config which annotator's
                # reward model it climbs.
                f"data.benchmark.single_harm_penalty={hydra_list(values)}",
            )
            job_dir = root / "single" / f"seed{seed}" / f"penalty_{name}"
            job = PPOJob("single", setting_name("single", name), seed, job_dir, single, None)
            slices.append(Slice(f"single_{name}_seed{seed}", job_dir, ".", single, None, (job,)))
    return reward_jobs, slices


def run_all(commands: Sequence[tuple[str, list[str]]], log_dir: Path, workers: int) -> None:
    """Run each command in its own process (one torch thread each), ``workers`` at a time, its
    output in log_dir/<name>.log; exit naming the failed ones once all have ended."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def run_one(named: tuple[str, list[str]]) -> int:
        name, command = named
        log = log_dir / f"{name}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(command)} > {log}", flush=True)
        start = time.perf_counter()
        with log.open("w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        status = "done" if code == 0 else f"FAILED (exit {code}, see {log})"
        print(
            f"[{time.strftime('%H:%M:%S')}] {name} {status} in {time.perf_counter() - start:.0f} s"
        )
        return code

    with ThreadPoolExecutor(max_workers=workers) as pool:
        codes = list(pool.map(run_one, commands))
    failed = [name for (name, _), code in zip(commands, codes, strict=True) if code != 0]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}; logs in {log_dir}")


def run_study(reward_jobs: Sequence[RewardJob], slices: Sequence[Slice], root: Path, workers: int):
    """Train the missing reward models, then run every slice's unfinished jobs."""
    rewards = []
    for job in reward_jobs:
        if finished(job.dir, job.overrides):
            print(f"reward_single_{job.name}: finished, not retrained")
        else:
            rewards.append((f"reward_single_{job.name}", job.command()))
    run_all(rewards, root / "logs", workers)
    commands = []
    for s in slices:
        pending = [j for j in s.jobs if not finished(j.dir, j.overrides)]
        if pending:
            commands.append((s.name, s.command(pending)))
        else:
            print(f"{s.name}: all {len(s.jobs)} jobs finished, not rerun")
    run_all(commands, root / "logs", workers)


def collect(jobs: Sequence[PPOJob]) -> list[dict]:
    """One record per finished job: variant (from its summary.json), setting, seed (from its
    config.yaml) and its initial and final metrics, in the order of ``jobs``."""
    records = []
    for job in jobs:
        if not finished(job.dir, job.overrides):
            print(f"not finished (or run with other overrides), left out: {job.dir}")
            continue
        summary = json.loads((job.dir / "summary.json").read_text())
        config = yaml.safe_load((job.dir / "config.yaml").read_text())
        if summary.get("variant") != job.variant:
            raise ValueError(
                f"{job.dir}: summary.json names variant {summary.get('variant')!r}, expected {job.variant!r}"
            )
        metrics = summary["metrics"]
        records.append(
            {
                "label": f"{summary['variant']} {job.setting}",
                "variant": summary["variant"],
                "setting": job.setting,
                "seed": config["seed"],
                "job": str(job.dir),
                **{
                    f"{stage}/{m}": metrics[f"{stage}/{m}"]
                    for stage in ("initial", "final")
                    for m in METRICS
                },
            }
        )
    return records


# -- the tables (pure) -------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(records: Sequence[Mapping]) -> list[dict]:
    """The SFT row (every job's initial policy), then one row per setting in the order of the
    records: the median and range over seeds of every metric."""
    sft = {
        "label": "sft (initial policy)",
        "variant": "sft",
        "setting": "",
        "seeds": sorted({r["seed"] for r in records}),
        "jobs": len(records),
    }
    # Each job scores the SFT policy with its own reward model: there is no one initial reward.
    sft |= {m: spread([r[f"initial/{m}"] for r in records]) for m in METRICS if m != "reward"}
    by_label: dict[str, list[Mapping]] = {}
    for record in records:
        by_label.setdefault(record["label"], []).append(record)
    rows = [sft]
    for label, runs in by_label.items():
        row = {
            "label": label,
            "variant": runs[0]["variant"],
            "setting": runs[0]["setting"],
            "seeds": sorted(r["seed"] for r in runs),
            "jobs": len(runs),
        }
        rows.append(row | {m: spread([r[f"final/{m}"] for r in runs]) for m in METRICS})
    return rows


def gold_comparison(gold: Sequence[GoldScore], dimension: str) -> tuple[list, bool]:
    """The per-response scores task=evaluate compares on ``dimension`` (readability first),
    taken from its own PolicyEval so that the two never disagree."""
    evaluation = PolicyEval("", "", pe.PolicySamples(), list(gold), None, {})
    _, scores, higher_is_better = evaluation.comparable(dimension)
    return scores, higher_is_better


def head_to_head(
    gold: Mapping[int, Mapping[str, Sequence[GoldScore]]],
    dual: Sequence[str],
    single: Sequence[str],
) -> list[dict]:
    """Each dual setting against each single setting, on the seeds where both ran: per
    dimension, the dual policy's win rate per seed, its median, and wins, losses and ties
    summed over seeds. ``gold``: seed -> setting label -> gold score per prompt."""
    pairs = []
    for a in dual:
        for b in single:
            seeds = [seed for seed in sorted(gold) if a in gold[seed] and b in gold[seed]]
            if not seeds:
                continue
            pair = {"dual": a, "single": b, "seeds": seeds}
            for dimension in DIMENSIONS:
                rates = []
                for seed in seeds:
                    scores_a, higher_is_better = gold_comparison(gold[seed][a], dimension)
                    scores_b, _ = gold_comparison(gold[seed][b], dimension)
                    rates.append(
                        pe.win_rate(pe.pairwise_outcomes(scores_a, scores_b, higher_is_better))
                    )
                pair[dimension] = {
                    "win_rate": statistics.median(r.rate for r in rates),
                    "per_seed": [r.rate for r in rates],
                    "wins": sum(r.wins for r in rates),
                    "losses": sum(r.losses for r in rates),
                    "ties": sum(r.ties for r in rates),
                }
            pairs.append(pair)
    return pairs


def spread_cell(s: Mapping[str, float] | None) -> str | None:
    if s is None:
        return None
    if s["min"] == s["max"]:
        return f"{s['median']:.3f}"
    return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def settings_table(rows: Sequence[Mapping]) -> str:
    header = ["setting", "seeds", *METRICS.values()]
    body = [[r["label"], r["seeds"], *(spread_cell(r.get(m)) for m in METRICS)] for r in rows]
    return markdown_table(header, body)


def head_to_head_table(pairs: Sequence[Mapping]) -> str:
    header = ["dual", "single", "seeds"]
    for dimension in DIMENSIONS:
        header += [f"{dimension}: dual win rate", f"{dimension}: W–L–T"]
    body = []
    for p in pairs:
        row = [p["dual"], p["single"], p["seeds"]]
        for dimension in DIMENSIONS:
            d = p[dimension]
            row += [d["win_rate"], f"{d['wins']}–{d['losses']}–{d['ties']}"]
        body.append(row)
    return markdown_table(header, body)


def report(
    rows: Sequence[Mapping],
    pairs: Sequence[Mapping],
    evaluation: Mapping,
    penalties: Mapping[str, Sequence[float]],
    base: Path,
) -> str:
    """frontier.md: the settings table and the head-to-head table, each saying what it shows."""
    penalty_text = ", ".join(f"{name} {list(values)}" for name, values in penalties.items())
    s = evaluation["sampling"]
    settings_text = (
        f"From `{base}`. Final policies on the PPO task's fixed eval prompts, from each job's "
        "summary.json: median over seeds (min–max). The SFT row is the initial policy of every "
        f"job. Single-preference harm penalties (severity 0, 1, 2, 3): {penalty_text}. The final "
        "reward is each job's own reward model (the dual one, or its annotator's single one), so "
        "it compares within a variant only."
    )
    head_to_head_text = (
        f"{evaluation['prompts']} prompts ({evaluation['prompt_source']}), "
        f"{evaluation['responses_per_prompt']} response(s) each, "
        f"max_new_tokens={s['max_new_tokens']}, temperature={s['temperature']}, "
        f"top_k={s['top_k']}, top_p={s['top_p']}, seed {evaluation['seed']}; the gold comparison "
        "of task=evaluate (an unreadable response loses on both dimensions). Dual win rate = "
        "wins / (wins + losses), median over the seeds; wins, losses and ties summed over them."
    )
    parts = [
        "# Safety-helpfulness frontier",
        settings_text,
        settings_table(rows),
        "## Dual against single, head to head",
        head_to_head_text,
        head_to_head_table(pairs),
    ]
    return "\n\n".join(parts) + "\n"


# -- sampling and the plot ---------------------------------------------------------------------


def sample_gold(records: Sequence[Mapping]) -> tuple[dict[int, dict[str, list[GoldScore]]], dict]:
    """Every final policy's responses to task=evaluate's prompt set, with each job's PPO
    sampling settings and task=evaluate's seed, scored by the oracle: seed -> label -> scores,
    and what was sampled how."""
    hf_logging.disable_progress_bar()  # one loading bar per policy would bury the tables
    oracle = Oracle()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts_by_data: dict[str, list[str]] = {}
    gold: dict[int, dict[str, list[GoldScore]]] = {}
    first = None
    for record in records:
        job = Path(record["job"])
        cfg = OmegaConf.load(job / "config.yaml")
        data_key = OmegaConf.to_yaml(cfg.data)
        if data_key not in prompts_by_data:
            test_prompts = views.prompts(load_data(cfg.data).splits["test"])
            prompts_by_data[data_key] = judged_prompts(test_prompts, EVALUATE)
        prompts = prompts_by_data[data_key]
        sampling = OmegaConf.to_container(cfg.eval.sampling)
        if first is None:
            first = (job, prompts, sampling)
        elif (prompts, sampling) != first[1:]:
            raise ValueError(
                f"{job} has other eval prompts or sampling settings than {first[0]}: a head-to-head "
                "needs the same for every policy"
            )
        policy_dir = str(job / "artifacts" / "policy")
        tokenizer = load_tokenizer(policy_dir, cfg.model.trust_remote_code)
        model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": policy_dir})
        policy = build_causal_lm(model_cfg, tokenizer).to(device).eval()
        max_prompt = cfg.model.max_length - sampling["max_new_tokens"]
        samples = pe.sample_and_score(
            policy, tokenizer, prompts, tokenize_prompts(tokenizer, prompts, max_prompt),
            sampling, EVALUATE.seed, EVALUATE.batch_size,
        )  # fmt: skip
        gold.setdefault(record["seed"], {})[record["label"]] = oracle.score_batch(
            prompts, samples.responses
        )
    evaluation = {
        "prompts": len(first[1]) // EVALUATE.responses_per_prompt,
        "responses_per_prompt": EVALUATE.responses_per_prompt,
        "prompt_source": f"task=evaluate's choice: up to {EVALUATE.num_prompts} of the test "
        f"split's distinct prompts, seed {EVALUATE.seed}",
        "sampling": first[2],
        "seed": EVALUATE.seed,
    }
    return gold, evaluation


STYLES = {  # variant: colour, marker, legend
    "safe_rlhf": ("tab:blue", "s", "PPO-Lagrangian, learned λ (cost limit d)"),
    "fixed": ("tab:orange", "^", "PPO, fixed λ (dual reward and cost)"),
    "single": ("tab:green", "o", "PPO, single preference (annotator penalty)"),
}


def pareto_plot(rows: Sequence[Mapping], path: Path) -> None:
    """Gold helpfulness against the gold unsafe-or-unreadable rate: each setting at its seed
    median, bars spanning the seed range; the SFT policy as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, y_key = "gold/unsafe_or_unreadable_rate", "gold/helpfulness"
    fig, ax = plt.subplots(figsize=(8, 6))
    legend_done = set()
    for row in rows:
        x, y = row[x_key], row[y_key]
        if row["variant"] == "sft":
            ax.scatter(x["median"], y["median"], marker="*", s=300, c="k", zorder=4, label="SFT")
            continue
        colour, marker, legend = STYLES[row["variant"]]
        ax.errorbar(
            x["median"], y["median"],
            xerr=[[x["median"] - x["min"]], [x["max"] - x["median"]]],
            yerr=[[y["median"] - y["min"]], [y["max"] - y["median"]]],
            fmt=marker, color=colour, markersize=8, capsize=3, zorder=3,
            label=None if row["variant"] in legend_done else legend,
        )  # fmt: skip
        legend_done.add(row["variant"])
        ax.annotate(
            row["setting"], (x["median"], y["median"]), textcoords="offset points",
            xytext=(6, 4), fontsize=8, color=colour,
        )  # fmt: skip
    seeds = sorted({seed for row in rows for seed in row["seeds"]})
    ax.set_xlabel("gold unsafe-or-unreadable rate (lower is better)")
    ax.set_ylabel("gold helpfulness (higher is better)")
    ax.set_title(f"final policies: median over seeds {seeds}, bars span the seeds")
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the command -------------------------------------------------------------------------------


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def penalty(text: str) -> tuple[str, tuple[float, ...]]:
    name, _, values = text.partition("=")
    return name, tuple(floats(values))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="a finished quickstart run dir")
    parser.add_argument("--seeds", default="0,1,2", help="PPO seeds (default 0,1,2)")
    parser.add_argument(
        "--cost-limits", type=floats, default=floats("-7,-5,-3,-1"),
        help="PPO-Lagrangian cost limits d; give them as --cost-limits=-7,-5 (default -7,-5,-3,-1)",
    )  # fmt: skip
    parser.add_argument(
        "--lambdas", type=floats, default=floats("0,0.25,0.5,1,2"),
        help="fixed λ values; 0 is helpfulness only (default 0,0.25,0.5,1,2)",
    )  # fmt: skip
    parser.add_argument(
        "--penalty", type=penalty, action="append", metavar="NAME=P0,P1,P2,P3",
        help="a single-preference annotator's harm penalty per severity tier; repeat for more "
        "(default: " + " ".join(f"{n}={','.join(map(str, v))}" for n, v in PENALTIES.items()) + ")",
    )  # fmt: skip
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes at a time (reward models, then PPO multiruns)",
    )
    parser.add_argument("--iterations", type=int, help="algo.iterations of every PPO job")
    parser.add_argument(
        "--aggregate-only",
        action="store_true",
        help="only the tables, win rates and plot of the finished jobs these options name",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides for every job, reward models included"
    )
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.penalties = dict(args.penalty) if args.penalty else PENALTIES
    base = args.base.resolve()
    root = base.parent / f"{base.name}_frontier"

    rewards = reward_dirs(base, root, args.penalties)
    reward_jobs, slices = plan(base, root, args, rewards)
    if not args.aggregate_only:
        run_study(reward_jobs, slices, root, args.workers)
    records = collect([job for s in slices for job in s.jobs])
    if not records:
        sys.exit(f"no finished jobs under {root}")
    rows = summarise(records)
    gold, evaluation = sample_gold(records)
    dual = list(dict.fromkeys(r["label"] for r in records if r["variant"] in DUAL_VARIANTS))
    single = list(dict.fromkeys(r["label"] for r in records if r["variant"] == "single"))
    pairs = head_to_head(gold, dual, single)

    markdown = report(rows, pairs, evaluation, args.penalties, base)
    (root / "frontier.md").write_text(markdown)
    result = {
        "base": str(base),
        "penalties": args.penalties,
        "settings": rows,
        "head_to_head": {"evaluation": evaluation, "pairs": pairs},
        "jobs": records,
    }
    (root / "frontier.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    pareto_plot(rows, root / "frontier_pareto.png")
    print(markdown)
    print(f"written: {root}/frontier.md, frontier.json, frontier_pareto.png")


if __name__ == "__main__":
    main()
