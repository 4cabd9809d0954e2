"""What a PPO run's config decides beyond per-value ranges: its checks, its decoding and the
``variant`` it reports."""

from __future__ import annotations

from saferlhf.errors import ConfigError


def check_ppo_config(cfg) -> None:
    """Fail before anything loads, naming the key, on what validate_config's per-value ranges
    cannot see: the length of algo.adam_betas, a λ rule the preference has no cost model for."""
    if len(cfg.algo.adam_betas) != 2:
        raise ConfigError(
            f"algo.adam_betas={list(cfg.algo.adam_betas)}: expected two values [β1, β2]"
        )
    if cfg.lagrange.name == "fixed" and not cfg.preference.use_cost:
        raise ConfigError(
            f"lagrange=fixed needs a cost model, which preference={cfg.preference.name} has "
            "not: use preference=dual"
        )


def decodes_compiled(algo, trainer_cfg) -> bool:
    """``algo.compile_generation``, or when unset: on CUDA when not sharded. Compiled decoding
    pays off where kernel launches dominate a decoding step, on GPUs."""
    if algo.compile_generation is not None:
        return algo.compile_generation
    return trainer_cfg.accelerator in ("gpu", "cuda") and trainer_cfg.strategy != "fsdp"


def ppo_variant(cfg) -> str:
    """The run's ``variant`` in ``summary.json``: the λ rule under preference=dual (``safe_rlhf``,
    ``fixed``), else the preference (``single``)."""
    return str(cfg.lagrange.name) if cfg.preference.use_cost else str(cfg.preference.name)
