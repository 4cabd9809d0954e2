"""The `eval` config node: one prompt set, seed and sampling for every task that judges a policy."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from saferlhf.cli import run
from saferlhf.models import build_causal_lm, save_artifact
from tests.tiny import benchmark_tokenizer, micro_model_cfg

JUDGING_TASKS = ("ppo", "dpo", "evaluate", "generate")
SMALL_DATA = ("data.benchmark.num_train=60", "data.benchmark.num_test=60")


def _leaf_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("task", JUDGING_TASKS)
def test_every_judging_task_reads_the_one_eval_node(compose_cfg, task):
    cfg = OmegaConf.to_container(compose_cfg(f"task={task}"), resolve=True)
    assert cfg["eval"] == OmegaConf.to_container(compose_cfg().eval, resolve=True)
    # Nothing else holds a prompt count, a seed for them or sampling settings.
    elsewhere = [
        key
        for group in ("task", "algo")
        for key in _leaf_keys(cfg[group])
        if any(word in key for word in ("sampling", "num_prompts", "eval_", "seed"))
    ]
    assert elsewhere == []


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    tokenizer = benchmark_tokenizer(num_train=200, vocab_size=700)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy")
    save_artifact(build_causal_lm(micro_model_cfg(), tokenizer), tokenizer, path)
    return path


def test_generate_answers_the_prompts_evaluate_judges_with_its_responses(
    compose_cfg, policy_dir, tmp_path
):
    # 8 prompts in batches of 4: evaluate's first round is generate's two batches exactly.
    judged_as = ("eval.num_prompts=8", "eval.batch_size=4", "eval.sampling.max_new_tokens=8")
    common = ("logger=none", "trainer.enable_progress_bar=false", *SMALL_DATA, *judged_as)
    run(
        compose_cfg("task=evaluate", *common, f"+task.policies.sft={policy_dir}"),
        tmp_path / "evaluate",
    )
    run(compose_cfg("task=generate", *common, f"policy_path={policy_dir}"), tmp_path / "generate")
    lines = (tmp_path / "evaluate" / "eval_responses.jsonl").read_text().splitlines()
    rows = list(map(json.loads, lines))
    assert len(rows) == 8 * 8  # eval.responses_per_prompt: 8 rounds
    evaluated = [(row["prompt"], row["response"]) for row in rows if row["round"] == 0]
    lines = (tmp_path / "generate" / "generations.jsonl").read_text().splitlines()
    generated = [(row["prompt"], row["response"]) for row in map(json.loads, lines)]
    assert len(evaluated) == 8 and generated == evaluated
