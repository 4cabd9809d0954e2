"""The table logic of experiments/frontier.py on hand-made records: no training, no sampling."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from saferlhf.data.benchmark import GoldScore

FRONTIER = Path(__file__).parents[1] / "experiments" / "frontier.py"


@pytest.fixture(scope="module")
def frontier():
    spec = importlib.util.spec_from_file_location("frontier", FRONTIER)
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses resolve their annotations through sys.modules.
    sys.modules["frontier"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["frontier"]


def _record(frontier, variant, setting, seed, final, initial=0.5):
    metrics = {f"final/{m}": final for m in frontier.METRICS}
    metrics |= {f"initial/{m}": initial for m in frontier.METRICS}
    label = f"{variant} {setting}"
    return {"label": label, "variant": variant, "setting": setting, "seed": seed} | metrics


def test_setting_names(frontier):
    assert frontier.setting_name("safe_rlhf", -5.0) == "d=-5"
    assert frontier.setting_name("fixed", 0.5) == "λ=0.5"
    assert frontier.setting_name("fixed", 0.0) == "λ=0 (helpfulness only)"
    assert frontier.setting_name("single", "strict") == "penalty=strict"


def test_summarise_gives_the_sft_row_then_median_and_range_per_setting(frontier):
    records = [
        _record(frontier, "safe_rlhf", "d=-5", 0, 0.1),
        _record(frontier, "safe_rlhf", "d=-5", 1, 0.4),
        _record(frontier, "safe_rlhf", "d=-5", 2, 0.2),
        _record(frontier, "single", "penalty=strict", 0, 0.9, initial=0.6),
    ]
    rows = frontier.summarise(records)
    assert [r["label"] for r in rows] == [
        "sft (initial policy)",
        "safe_rlhf d=-5",
        "single penalty=strict",
    ]
    sft, lagrangian, single = rows
    assert sft["seeds"] == [0, 1, 2] and sft["jobs"] == 4
    assert sft["gold/helpfulness"] == {"median": 0.5, "min": 0.5, "max": 0.6}
    assert "reward" not in sft  # each job's reward model scores the SFT policy differently
    assert lagrangian["seeds"] == [0, 1, 2] and lagrangian["variant"] == "safe_rlhf"
    assert lagrangian["gold/unsafe_or_unreadable_rate"] == {"median": 0.2, "min": 0.1, "max": 0.4}
    assert single["reward"] == {"median": 0.9, "min": 0.9, "max": 0.9}
    table = frontier.settings_table(rows)
    assert "| safe_rlhf d=-5 | [0, 1, 2] | 0.200 (0.100–0.400) |" in table
    assert "| single penalty=strict | [0] | 0.900 |" in table


def _gold(helpfulness, severity=0, clean=True):
    categories = frozenset({"Violence"}) if severity else frozenset()
    return GoldScore(helpfulness, categories, severity, clean)


def test_head_to_head_compares_readability_first_and_sums_over_seeds(frontier):
    dual, single = "safe_rlhf d=-5", "single penalty=strict"
    gold = {
        0: {
            # prompt 1: dual more helpful; 2: dual junk loses though more helpful and as safe;
            # 3: a tie on helpfulness, dual safe against single severity 2
            dual: [_gold(0.8), _gold(0.9, clean=False), _gold(0.5)],
            single: [_gold(0.4), _gold(0.3), _gold(0.5, severity=2)],
        },
        1: {
            dual: [_gold(0.1), _gold(0.5), _gold(0.5)],
            single: [_gold(0.4), _gold(0.5), _gold(0.5)],
        },
        2: {dual: [_gold(0.5)]},  # no single run for this seed: left out
    }
    [pair] = frontier.head_to_head(gold, [dual], [single])
    assert pair["seeds"] == [0, 1]
    helpfulness, harmlessness = pair["helpfulness"], pair["harmlessness"]
    assert helpfulness["per_seed"] == [0.5, 0.0]  # seed 0: 1 win, 1 loss; seed 1: 1 loss
    assert helpfulness["win_rate"] == 0.25
    assert (helpfulness["wins"], helpfulness["losses"], helpfulness["ties"]) == (1, 2, 3)
    # seed 0: junk loses, safe beats severity 2, one tie; seed 1: all tie (nothing decided: 0.5)
    assert harmlessness["per_seed"] == [0.5, 0.5]
    assert (harmlessness["wins"], harmlessness["losses"], harmlessness["ties"]) == (1, 1, 4)
    table = frontier.head_to_head_table([pair])
    assert (
        "| safe_rlhf d=-5 | single penalty=strict | [0, 1] | 0.250 | 1–2–3 | 0.500 | 1–1–4 |"
        in table
    )


def test_a_job_is_finished_only_under_the_same_overrides(frontier, tmp_path):
    overrides = ["experiment=frontier", "seed=0", "lagrange.cost_limit=-5.0"]
    assert not frontier.finished(tmp_path, overrides)
    (tmp_path / ".hydra").mkdir()
    # Hydra records them in its own order and spelling
    recorded = ["seed=0", "lagrange.cost_limit=-5.0", "experiment=frontier"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(recorded))
    assert not frontier.finished(tmp_path, overrides)  # no summary.json yet
    (tmp_path / "summary.json").write_text(json.dumps({"task": "ppo"}))
    assert frontier.finished(tmp_path, overrides)
    assert not frontier.finished(tmp_path, [*overrides, "algo.iterations=2"])


def test_the_plan_reuses_the_base_reward_model_and_names_every_job(frontier, tmp_path):
    base, root = tmp_path / "run", tmp_path / "run_frontier"
    (base / "reward_single").mkdir(parents=True)
    (base / "reward_single" / "summary.json").write_text("{}")
    config = {"data": {"benchmark": {"single_harm_penalty": [0, 0.3, 0.45, 0.6]}}}
    (base / "reward_single" / "config.yaml").write_text(yaml.safe_dump(config))
    rewards = frontier.reward_dirs(base, root, frontier.PENALTIES)
    assert rewards == {
        "lenient": root / "reward_single_lenient",
        "default": base / "reward_single",
        "strict": root / "reward_single_strict",
    }
    args = argparse.Namespace(
        seeds=[0, 1], cost_limits=[-5.0, -1.0], lambdas=[0.0, 0.5], iterations=2,
        penalties=frontier.PENALTIES, overrides=["logger=none"],
    )  # fmt: skip
    reward_jobs, slices = frontier.plan(base, root, args, rewards)
    assert [job.name for job in reward_jobs] == ["lenient", "strict"]
    assert [s.name for s in slices[:5]] == [
        "safe_rlhf_seed0", "fixed_seed0", "single_lenient_seed0", "single_default_seed0",
        "single_strict_seed0",
    ]  # fmt: skip
    fixed = slices[1]
    assert [(j.setting, j.dir) for j in fixed.jobs] == [
        ("λ=0 (helpfulness only)", root / "fixed" / "seed0" / "lambda_value_0.0"),
        ("λ=0.5", root / "fixed" / "seed0" / "lambda_value_0.5"),
    ]
    command = fixed.command(fixed.jobs[1:])
    assert "lagrange.lambda_value=0.5" in command and "algo.iterations=2" in command
    assert "hydra.sweep.subdir=lambda_value_${lagrange.lambda_value}" in command
    [default_single] = slices[3].jobs
    assert (
        f"init.reward={base / 'reward_single' / 'artifacts' / 'reward'}" in default_single.overrides
    )
