import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from saferlhf import CONF_DIR
from saferlhf.config import POSITIVE, Interval, validate_config, value_error
from saferlhf.errors import ConfigError

# Each group and a key every option of it must set.
GROUP_KEYS = {
    "task": "name",
    "data": "source",
    "model": "name",
    "trainer": "accelerator",
    "logger": "name",
    "preference": "name",
    "algo": "iterations",
    "lagrange": "name",
}


def _options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUP_KEYS)
def test_every_option_of_every_group_composes_and_resolves(compose_cfg, group, tmp_path):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        cfg = compose_cfg(f"{group}={option}", f"data.path={tmp_path}")
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved[group][GROUP_KEYS[group]], (group, option)


def test_defaults_are_the_offline_cpu_setting(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.data.source, cfg.model.name, cfg.trainer.accelerator) == (
        "benchmark",
        "tiny",
        "cpu",
    )
    assert cfg.logger.name == "wandb" and cfg.logger.offline is True
    assert cfg.preference.name == "dual" and cfg.data.kind == "preference"
    assert compose_cfg("preference=single").data.kind == "single"


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.benchmark.num_trian=10", "num_trian"),
        ("data.nme=foo", "nme"),
        ("data.benchmark.num_train=many", "num_train"),
        ("trainer=tpu_pod", "tpu_pod"),
        ("lagrange.name=learned", "lagrange.name"),
        ("lagrange.update_per=epoch", "lagrange.update_per"),
        ("algo.loss_aggregation=sum", "algo.loss_aggregation"),
        ("algo.ptx_mode=before", "algo.ptx_mode"),
        ("algo.actor_lr_schedule=linear", "algo.actor_lr_schedule"),
        ("algo.shaping_lambda=1.0", "shaping_lambda"),
    ],
)
def test_typo_in_an_override_is_an_error(compose_cfg, override, words):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(override)
    assert words in str(info.value) or words in str(info.value.__cause__)


def test_typo_from_the_shell_fails_with_the_key_named(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "saferlhf.cli",
            "data.benchmark.num_trian=10",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "num_trian" in result.stderr
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_under_its_own_name(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    assert cfg.experiment_name == experiment
    OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_a_fixed_lambda_composes_with_every_experiment(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}", "lagrange=fixed", "lagrange.lambda_value=0")
    assert (cfg.lagrange.name, cfg.lagrange.lambda_value) == ("fixed", 0.0)


def test_wandb_tags_name_the_task_the_preference_and_the_lambda_rule(compose_cfg):
    cfg = compose_cfg("task=ppo", "lagrange=fixed")
    assert OmegaConf.to_container(cfg.logger, resolve=True)["tags"] == ["ppo", "dual", "fixed"]


# -- values validated when the config is composed ---------------------------------------------


@pytest.mark.parametrize("group", GROUP_KEYS)
def test_every_option_of_every_group_passes_validation(compose_cfg, group, tmp_path):
    for option in _options(group):
        validate_config(compose_cfg(f"{group}={option}", f"data.path={tmp_path}"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lagrange.cost_limit=nan"], "lagrange.cost_limit=nan: expected a finite number"),
        (["lagrange.cost_limit=-inf"], "lagrange.cost_limit=-inf: expected a finite number"),
        (["lagrange.lambda_init=0"], "lagrange.lambda_init=0.0: expected a value > 0"),
        (["lagrange.lambda_init=-1"], "lagrange.lambda_init=-1.0: expected a value > 0"),
        (["lagrange.window=0"], "lagrange.window=0: expected a value >= 1"),
        (["lagrange=fixed", "lagrange.lambda_value=-1"], "lagrange.lambda_value=-1.0"),
        (["algo.iterations=0"], "algo.iterations=0: expected a value >= 1"),
        (["algo.minibatch_size=0"], "algo.minibatch_size=0"),
        (["algo.actor_lr=0"], "algo.actor_lr=0.0: expected a value > 0"),
        (["eval.sampling.top_p=1.5"], "eval.sampling.top_p=1.5: expected a value in (0, 1]"),
        (["algo.adam_betas=[0.9,1.0]"], "algo.adam_betas.1=1.0: expected a value in [0, 1)"),
        (["algo.gamma=1.01"], "algo.gamma=1.01: expected a value in [0, 1]"),
        (["algo.logprob_chunk=-1"], "algo.logprob_chunk=-1: expected a value >= 0"),
        (["task=sft", "task.max_epochs=0"], "task.max_epochs=0: expected a value >= 1"),
        (["task=sft", "task.batch_size=0"], "task.batch_size=0: expected a value >= 1"),
        (["task=reward", "task.batch_size=-4"], "task.batch_size=-4"),
        (["task=sft", "task.lr=inf"], "task.lr=inf: expected a finite number"),
        (["task=moderation", "task.val_fraction=1"], "task.val_fraction=1.0"),
        (["task=generate", "eval.sampling.temperature=0"], "eval.sampling.temperature=0.0"),
        (["data.benchmark.single_harm_penalty=[0,1,nan,3]"], "single_harm_penalty.2=nan"),
        (["+model.arch.rope_theta=inf"], "model.arch.rope_theta=inf: expected a finite number"),
        (["seed=-1"], "seed=-1: expected a value in [0, 4294967295]"),
        (["experiment_name=???"], "experiment_name"),
    ],
)
def test_a_value_no_run_can_use_is_refused_naming_its_key(compose_cfg, overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["task=ppo", "model.max_length=48"],
            "model.max_length=48: expected a value > eval.sampling.max_new_tokens=48",
        ),
        (
            ["task=dpo", "model.max_length=20", "eval.sampling.max_new_tokens=30"],
            "model.max_length=20: expected a value > eval.sampling.max_new_tokens=30",
        ),
        (
            ["task=generate", "model.max_length=64", "eval.sampling.max_new_tokens=100"],
            "model.max_length=64: expected a value > eval.sampling.max_new_tokens=100",
        ),
        (
            ["task=evaluate", "model.max_length=12"],
            "model.max_length=12: expected a value > eval.sampling.max_new_tokens=48",
        ),
        (
            ["task=ppo", "lagrange.lambda_init=5.5", "lagrange.lambda_max=5"],
            "lagrange.lambda_init=5.5: expected a value <= lagrange.lambda_max=5.0",
        ),
    ],
)
def test_values_that_cannot_go_together_are_refused_naming_both_keys(
    compose_cfg, overrides, message
):
    with pytest.raises(ConfigError) as refused:
        validate_config(compose_cfg(*overrides))
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["task=ppo", "model.max_length=49"],  # one token of prompt room is enough here
        ["task=sft", "model.max_length=40"],  # samples nothing
        ["task=moderation", "model.max_length=16"],
        ["task=dpo", "data=local", "data.path=x", "model.max_length=40"],  # no gold sampling
        ["task=ppo", "lagrange.lambda_init=5", "lagrange.lambda_max=5"],
        ["task=ppo", "lagrange=fixed", "lagrange.lambda_value=50"],  # no lambda_max to exceed
    ],
)
def test_values_that_go_together_pass(compose_cfg, overrides):
    validate_config(compose_cfg(*overrides))


def test_judge_settings_are_refused_with_the_config_before_the_run_dir_holds_them(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "saferlhf.cli",
            "task=evaluate",
            f"+task.policies.sft={tmp_path}",
            "task.judge.enabled=true",
            "task.judge.base_url=https://ann:s3cret-pw@judge.example/v1",
            "task.judge.model=m",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("saferlhf: error: task.judge.base_url=https://***@judge")
    assert "s3cret-pw" not in result.stderr
    assert not (run_dir / "config.yaml").exists()


def test_null_turns_an_option_off_and_is_not_range_checked(compose_cfg):
    validate_config(compose_cfg("algo.score_clip=null", "num_threads=null"))
    assert value_error("algo.score_clip", None) is None


def test_intervals_read_as_the_values_they_allow():
    assert [str(i) for i in (POSITIVE, Interval(low=1), Interval(0, 1, low_open=True))] == [
        "> 0",
        ">= 1",
        "in (0, 1]",
    ]
    assert 0 not in POSITIVE and 1e-9 in POSITIVE and 1 in Interval(0, 1, low_open=True)


def test_the_command_refuses_a_bad_value_before_anything_loads(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "saferlhf.cli",
            "lagrange.cost_limit=nan",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "saferlhf: error: lagrange.cost_limit=nan: expected a finite number"
    )
    assert not (tmp_path / "config.yaml").exists()  # refused before the run dir was written to
