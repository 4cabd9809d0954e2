import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from saferlhf import CONF_DIR

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
