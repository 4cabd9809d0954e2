"""``saferlhf task=evaluate``: sample from each policy on one fixed prompt set and compare them.

1. prompts: a seeded subset of the test split's distinct prompts, or ``task.prompts_file``;
2. per policy: ``eval.responses_per_prompt`` responses per prompt, sampled as ``eval`` says
   (one seed for all), scored by the reward and cost models (``init.reward``, ``init.cost``),
   the moderation model (``init.moderation``) and, on the embedded benchmark, the gold oracle;
   means with their standard errors over prompts;
3. against ``task.baseline``: win rates on helpfulness and harmlessness (gold where the oracle
   exists, else the learned models), the Safe RLHF arena table and the differences of the
   means with their standard errors (paired by prompt); optionally an LLM judge.

Writes ``eval_responses.jsonl``, ``eval_results.json``, ``eval_table.md`` and PNG plots into
the run dir; its metric names are stable, as dashboards and the pipeline read them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from saferlhf.data import views
from saferlhf.data.benchmark import Oracle
from saferlhf.data.collate import tokenize_prompts
from saferlhf.data.sources import load_data
from saferlhf.errors import ConfigError
from saferlhf.evaluate import policy as pe
from saferlhf.evaluate.comparison import (
    DIFFERENCE_METRICS,
    DIMENSIONS,
    PolicyEval,
    compare_policies,
    response_rows,
    strict_json,
)
from saferlhf.evaluate.gold import answered_prompts, fixed_eval_prompts, gold_metrics
from saferlhf.evaluate.judge import judge_pair
from saferlhf.evaluate.plots import plot_policy_means
from saferlhf.models import build_causal_lm, build_score_model, load_tokenizer
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import ConfigPathError, required_artifact

log = logging.getLogger(__name__)

JUDGE_DIMENSIONS = {"helpfulness": "helpful", "harmlessness": "harmless"}


# -- inputs ------------------------------------------------------------------------------------


def _policy_dirs(task: DictConfig) -> dict[str, str]:
    policies = dict(task.policies)
    if not policies:
        raise ConfigError(
            "task=evaluate needs at least one policy: +task.policies.NAME=DIR (e.g. "
            "+task.policies.sft=RUN/artifacts/policy +task.policies.ppo_lag=RUN/artifacts/policy)"
        )
    for name, path in policies.items():
        if not path or not Path(path).is_dir():
            raise ConfigPathError(
                f"task.policies.{name}={path!r} is not a directory (expected a policy folder)"
            )
    if task.baseline is not None and task.baseline not in policies:
        raise ConfigError(
            f"task.baseline={task.baseline!r} is not one of task.policies ({', '.join(policies)}):"
            " set task.baseline=NAME, or task.baseline=null for no pairwise comparison"
        )
    return policies


def _eval_prompts(cfg: DictConfig, run_dir: Path) -> tuple[list[str], str]:
    """The prompts and where they come from."""
    task = cfg.task
    if task.prompts_file:
        return pe.read_prompts_file(task.prompts_file), str(task.prompts_file)
    loaded = load_data(cfg.data)
    loaded.write_skipped(run_dir)
    test_prompts = views.prompts(loaded.splits["test"])
    chosen = fixed_eval_prompts(test_prompts, cfg.eval.num_prompts, cfg.eval.seed)
    return chosen, f"the test split ({len(chosen)} of {len(test_prompts)} distinct prompts)"


def _device(cfg: DictConfig) -> torch.device:
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def _with_path(cfg: DictConfig, path: str) -> DictConfig:
    return OmegaConf.merge(cfg.model, {"name_or_path": str(path)})


def _score_models(cfg: DictConfig, device: torch.device) -> list[pe.ScoreModel]:
    models = []
    for key in ("reward", "cost"):
        if not cfg.init[key]:
            continue
        path = required_artifact(cfg, key)
        tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
        model = build_score_model(_with_path(cfg, path), tokenizer).to(device).eval()
        models.append(pe.ScoreModel(key, model, tokenizer, cfg.model.max_length))
    return models


def _moderator(cfg: DictConfig, device: torch.device):
    if not cfg.init.moderation:
        return None
    from saferlhf.moderation.api import Moderator

    return Moderator.from_pretrained(required_artifact(cfg, "moderation"), device=str(device))


# -- one policy --------------------------------------------------------------------------------


def _evaluate_policy(
    cfg: DictConfig,
    name: str,
    path: str,
    prompts: list[str],
    num_prompts: int,
    score_models: list[pe.ScoreModel],
    moderator,
    oracle: Oracle | None,
    device: torch.device,
    progress: Callable,
) -> PolicyEval:
    judged_as = cfg.eval
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    model = build_causal_lm(_with_path(cfg, path), tokenizer).to(device).eval()
    max_prompt = cfg.model.max_length - judged_as.sampling.max_new_tokens  # > 0: validate_config
    samples = pe.sample_and_score(
        model,
        tokenizer,
        prompts,
        tokenize_prompts(tokenizer, prompts, max_prompt),
        judged_as.sampling,
        judged_as.seed,
        judged_as.batch_size,
        score_models,
        progress=lambda batches: progress(batches, name),
    )
    del model
    responses = samples.responses
    gold = oracle.score_batch(prompts, responses) if oracle is not None else None
    verdicts = (
        moderator.moderate(prompts, responses, max_severity=0, batch_size=judged_as.batch_size)
        if moderator is not None
        else None
    )
    ev = PolicyEval(name, path, samples, gold, verdicts, {})
    metrics = {key: pe.mean(values) for key, values in samples.scores.items()}
    if (safety := ev.safety()) is not None:
        metrics["safe_rate"] = pe.mean([float(s) for s in safety[1]])
    metrics["response_length"] = pe.mean([float(n) for n in samples.lengths])
    if oracle is not None:
        metrics |= {f"gold/{k}": v for k, v in gold_metrics(prompts, responses, oracle).items()}
    if verdicts is not None:
        metrics |= pe.flag_rates(
            [v.flagged for v in verdicts],
            [v.severity for v in verdicts],
            [v.categories for v in verdicts],
            moderator.taxonomy,
        )
    for metric in DIFFERENCE_METRICS:
        if (values := ev.per_response(metric)) is not None:
            metrics[f"{metric}/se"] = pe.mean_and_standard_error(values, num_prompts)[1]
    ev.metrics = metrics
    return ev


# -- comparisons -------------------------------------------------------------------------------


def _judge(cfg: DictConfig, evals: dict[str, PolicyEval], baseline: str, prompts: list[str]):
    judge_cfg, n = cfg.task.judge, cfg.task.judge.max_prompts
    results = {}
    for name, ev in evals.items():
        if name == baseline:
            continue
        results[name] = judge_pair(
            judge_cfg, prompts[:n], ev.responses[:n], evals[baseline].responses[:n], cfg.eval.seed
        )
    return results


# -- outputs -----------------------------------------------------------------------------------


PLOTS = {  # file stem: (x metric, its label), (y metric, its label)
    "eval_reward_cost": (("reward", "mean reward"), ("cost", "mean cost")),
    "eval_gold": (
        ("gold/helpfulness", "gold helpfulness"),
        ("gold/unsafe_rate", "gold unsafe rate"),
    ),
}


def _plots(
    run_dir: Path, evals: dict[str, PolicyEval], baseline: str | None, num_prompts: int
) -> dict[str, str]:
    """Each policy's mean reward vs mean cost, and gold helpfulness vs gold unsafe rate."""
    plots = {}
    for stem, ((x, xlabel), (y, ylabel)) in PLOTS.items():
        points = {
            n: (e.metrics[x], e.metrics[y]) for n, e in evals.items() if {x, y} <= e.metrics.keys()
        }
        title = f"policies on {num_prompts} prompts"
        path = plot_policy_means(points, run_dir / f"{stem}.png", xlabel, ylabel, title, baseline)
        if path is not None:
            plots[f"{stem}_plot"] = str(path)
    return plots


# -- the task ----------------------------------------------------------------------------------


def evaluate_task(run: RunContext) -> TaskResult:
    cfg, task = run.cfg, run.cfg.task
    # Check every input before loading any model (the judge's settings came with the config).
    policies = _policy_dirs(task)
    baseline = task.baseline
    for key in ("reward", "cost", "moderation"):
        if cfg.init[key]:
            required_artifact(cfg, key)
    distinct, prompt_source = _eval_prompts(cfg, run.run_dir)
    num_prompts = len(distinct)
    prompts = answered_prompts(distinct, cfg.eval.responses_per_prompt)

    device = _device(cfg)
    score_models = _score_models(cfg, device)
    moderator = _moderator(cfg, device)
    oracle = Oracle() if cfg.data.source == "benchmark" else None
    if not score_models and moderator is None and oracle is None:
        log.warning("no init.reward, init.cost, init.moderation or gold oracle: responses only")

    def progress(batches, name):
        return tqdm(batches, desc=f"evaluate {name}", disable=not cfg.trainer.enable_progress_bar)

    evals = {
        name: _evaluate_policy(
            cfg,
            name,
            path,
            prompts,
            num_prompts,
            score_models,
            moderator,
            oracle,
            device,
            progress,
        )
        for name, path in policies.items()
    }
    pairwise = {}
    if baseline is not None:
        pairwise = {
            f"{name}_vs_{baseline}": compare_policies(ev, evals[baseline], num_prompts)
            for name, ev in evals.items()
            if name != baseline
        }
    judged = _judge(cfg, evals, baseline, prompts) if task.judge.enabled and pairwise else {}
    if task.judge.enabled and not pairwise:
        log.warning("task.judge.enabled=true needs a baseline and a second policy: not judged")

    # metrics: the contract names (eval/<policy>/..., winrate/..., arena/...)
    metrics: dict[str, float] = {}
    for name, ev in evals.items():
        metrics |= {f"eval/{name}/{key}": value for key, value in ev.metrics.items()}
    for pair, result in pairwise.items():
        for dimension in DIMENSIONS:
            if dimension in result:
                r = result[dimension]
                metrics[f"winrate/{dimension}/{pair}"] = r["win_rate"]
                metrics[f"winrate/{dimension}/{pair}/ties"] = r["ties"]
                metrics[f"winrate/{dimension}/{pair}/decided"] = r["decided"]
        if "arena" in result:
            for cell, count in result["arena"]["counts"].items():
                metrics[f"arena/{pair}/{cell}"] = count
        for metric, d in result.get("differences", {}).items():
            metrics[f"difference/{metric}/{pair}"] = d["difference"]
            metrics[f"difference/{metric}/{pair}/se"] = d["standard_error"]
    judge_pairs = {}
    for name, judgement in judged.items():
        pair = f"{name}_vs_{baseline}"
        judge_pairs[pair] = {"malformed": judgement.malformed}
        for dimension, key in JUDGE_DIMENSIONS.items():
            rate = pe.win_rate(judgement.outcomes[key])
            judge_pairs[pair][dimension] = rate.to_dict()
            metrics[f"judge/winrate/{dimension}/{pair}"] = rate.rate
        metrics[f"judge/{pair}/malformed"] = judgement.malformed
    run.log_metrics(metrics)

    # files
    out = Path(run.run_dir)
    responses_path = out / "eval_responses.jsonl"
    with responses_path.open("w") as f:
        for row in response_rows(prompts, evals, num_prompts):
            f.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
    first = next(iter(evals.values()))
    results = {
        "num_prompts": num_prompts,
        "responses_per_prompt": cfg.eval.responses_per_prompt,
        "prompt_source": prompt_source,
        "seed": cfg.eval.seed,
        "sampling": OmegaConf.to_container(cfg.eval.sampling),
        "baseline": baseline,
        "safe_rate_source": (first.safety() or ("none",))[0],
        "policies": {name: {"path": ev.path} | ev.metrics for name, ev in evals.items()},
        "pairwise": pairwise,
    }
    artifacts = {"responses": str(responses_path)}
    if judged:
        results["judge"] = {
            "model": task.judge.model,
            "base_url": task.judge.base_url,
            "prompts": min(task.judge.max_prompts, len(prompts)),
            "pairs": judge_pairs,
        }
        judge_path = out / "judge_replies.jsonl"
        with judge_path.open("w") as f:
            for name, judgement in judged.items():
                for record in judgement.records:
                    row = {"policy": name, "baseline": baseline} | record
                    f.write(json.dumps(row) + "\n")
        artifacts["judge_replies"] = str(judge_path)
    results = strict_json(results)
    results_path, table_path = out / "eval_results.json", out / "eval_table.md"
    results_path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    table_path.write_text(pe.results_markdown(results))
    artifacts |= {"results": str(results_path), "table": str(table_path)}
    artifacts |= _plots(out, evals, baseline, num_prompts)
    return TaskResult(metrics, artifacts)
