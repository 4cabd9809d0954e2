"""A new λ rule is one class and one YAML file: a rule defined and registered here, with its YAML
in a config folder of its own on Hydra's search path, is chosen with ``lagrange=geometric``,
type-checked, and drives a real PPO-Lagrangian run."""

import json
from dataclasses import dataclass

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING

from saferlhf import CONF_DIR
from saferlhf.cli import run
from saferlhf.config import LagrangeConfig, register_configs
from saferlhf.errors import ConfigError
from saferlhf.rl.lagrange import Multiplier, multiplier_from_config, register_rule
from saferlhf.run import read_summary
from tests.tiny import save_micro_artifacts


@register_rule("geometric")
class GeometricMultiplier(Multiplier):
    """λ = lambda_init · factor^k after k iterations, whatever the cost."""

    @dataclass
    class Config(LagrangeConfig):
        lambda_init: float = MISSING
        factor: float = MISSING

    update_per = "iteration"

    def __init__(self, lambda_init: float, factor: float):
        super().__init__()
        self.lambda_value, self.factor = lambda_init, factor

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.lambda_init, cfg.factor)

    @property
    def value(self) -> float:
        return self.lambda_value

    def record(self, episode_costs: torch.Tensor) -> float:
        return episode_costs.float().mean().item()

    def step(self, optimizer: None, episode_cost: float) -> None:
        self.lambda_value *= self.factor

    def make_optimizer(self) -> None:
        return None


GEOMETRIC_YAML = """\
defaults:
  - geometric_schema

lambda_init: 0.5
factor: 2.0
cost_limit: 0.0
"""


def _compose(config_dir, *overrides):
    """The project's config tree with ``config_dir`` on Hydra's search path."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"hydra.searchpath=[file://{config_dir}]", *overrides],
        )


def _config_dir(tmp_path, name="geometric", text=GEOMETRIC_YAML):
    (tmp_path / "conf" / "lagrange").mkdir(parents=True)
    (tmp_path / "conf" / "lagrange" / f"{name}.yaml").write_text(text)
    return tmp_path / "conf"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Untrained micro policy, reward and cost folders, as earlier stages would write them."""
    return save_micro_artifacts(tmp_path_factory.mktemp("artifacts"))


def test_a_rule_registered_here_drives_lambda_in_a_ppo_run(artifacts, tmp_path):
    cfg = _compose(
        _config_dir(tmp_path),
        "lagrange=geometric",
        "lagrange.lambda_init=0.25",
        "lagrange.factor=3",
        "task=ppo",
        "logger=none",
        "num_threads=1",
        "trainer.enable_progress_bar=false",
        "data.benchmark.num_train=64",
        "data.benchmark.num_test=16",
        f"init.policy={artifacts / 'policy'}",
        f"init.reward={artifacts / 'reward'}",
        f"init.cost={artifacts / 'cost'}",
        "algo.iterations=3",
        "algo.rollout_batch_size=8",
        "algo.minibatch_size=8",
        "algo.ppo_epochs=1",
        "eval.num_prompts=8",
        "eval.sampling.max_new_tokens=8",
    )
    run(cfg, tmp_path / "run")
    history = json.loads((tmp_path / "run" / "ppo_history.json").read_text())
    assert [h["lagrange/lambda"] for h in history] == pytest.approx([0.75, 2.25, 6.75])
    summary = read_summary(tmp_path / "run")
    assert summary["variant"] == "geometric"
    assert summary["metrics"]["lagrange/lambda"] == pytest.approx(6.75)


@pytest.mark.parametrize(
    "yaml_text, overrides, key",
    [
        (GEOMETRIC_YAML.replace("2.0", "fast"), (), "lagrange.factor"),  # in the rule's YAML
        (GEOMETRIC_YAML, ("lagrange.factor=fast",), "lagrange.factor"),
        (GEOMETRIC_YAML, ("lagrange.name=fixed",), "lagrange.name"),  # another rule's name
    ],
    ids=["yaml", "override", "name"],
)
def test_the_rules_schema_refuses_a_wrong_type_or_another_rules_name(
    tmp_path, yaml_text, overrides, key
):
    with pytest.raises(ConfigCompositionException) as refused:
        _compose(_config_dir(tmp_path, text=yaml_text), "lagrange=geometric", *overrides)
    # Hydra names the key in its message or in the OmegaConf error it wraps.
    assert key in f"{refused.value} {refused.value.__cause__}"


def test_an_unregistered_rule_is_a_config_error_naming_the_registered_ones(tmp_path):
    # A YAML without a schema composes; no class has the name it gives.
    config_dir = _config_dir(tmp_path, "pid", "name: pid\ncost_limit: 0.0\n")
    lagrange = _compose(config_dir, "lagrange=pid").lagrange
    with pytest.raises(ConfigError) as refused:
        multiplier_from_config(lagrange)
    message = str(refused.value)
    assert message.startswith("lagrange.name='pid': expected one of [")
    assert all(f"'{name}'" in message for name in ("fixed", "geometric", "safe_rlhf"))


def test_a_rule_needs_a_lagrange_config_and_a_name_of_its_own():
    with pytest.raises(ValueError, match="'fixed' is taken by FixedMultiplier"):
        register_rule("fixed")(GeometricMultiplier)
    with pytest.raises(TypeError, match="expected a LagrangeConfig subclass"):

        @register_rule("unchecked")
        class Unchecked(GeometricMultiplier):
            @dataclass
            class Config:
                factor: float = MISSING
