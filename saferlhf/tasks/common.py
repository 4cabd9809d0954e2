"""Pieces every training stage shares: model sources, the Trainer, checkpoints, gold scores,
and the guards every fit runs with (non-finite training stops; SIGTERM checkpoints)."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from saferlhf.data import benchmark
from saferlhf.data.collate import format_conversation
from saferlhf.errors import ConfigError, UserError
from saferlhf.models import build_tokenizer, save_artifact, score_head_at
from saferlhf.models.sharding import ShardedDataParallel, local_part, unsharded_copy
from saferlhf.run import RunContext

log = logging.getLogger(__name__)


class ConfigPathError(ConfigError, FileNotFoundError):
    """A config key names a file or folder that is not there."""


class NonFiniteError(UserError):
    """Training produced a NaN or infinite loss, statistic or weight; the run stops before
    writing a checkpoint or artifact from it."""


def model_config(cfg: DictConfig, init_key: str | None) -> DictConfig:
    """``cfg.model``, or the artifact named by ``cfg.init.<init_key>`` when that is set."""
    path = cfg.init[init_key] if init_key else None
    if not path:
        return cfg.model
    if not Path(path).is_dir():
        raise ConfigPathError(
            f"init.{init_key}={path!r} is not a directory (expected a Hugging Face folder)"
        )
    return OmegaConf.merge(cfg.model, {"name_or_path": str(path)})


def pack_length(model_cfg: DictConfig) -> int | None:
    """The row length training collators pack sequences into (``model.max_length``) when
    ``model.pack_sequences`` is on; None: right-padded rows."""
    return model_cfg.max_length if model_cfg.pack_sequences else None


def last_token_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sequence-classification model's head output at the last token of each sequence of a
    :func:`~saferlhf.data.collate.sequence_layout` batch, padded or packed, ``(N, num_labels)``
    (packed: :func:`~saferlhf.models.score_head_at` at the sequences' ends)."""
    if "ends" not in batch:
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
    return score_head_at(
        model,
        batch["ends"],
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )


def required_artifact(cfg: DictConfig, init_key: str) -> str:
    """The path in ``cfg.init.<init_key>``; a clear error naming the key when it is unset or absent."""
    path = cfg.init[init_key]
    if not path:
        raise ConfigError(
            f"this stage needs init.{init_key}=DIR (the artifacts/{init_key} folder of an earlier run)"
        )
    if not Path(path).is_dir():
        raise ConfigPathError(
            f"init.{init_key}={path!r} is not a directory (expected a Hugging Face folder)"
        )
    return str(path)


def tokenizer_for(model_cfg: DictConfig, train_rows: Any) -> PreTrainedTokenizerBase:
    """Load the named tokenizer, or train one on the train split's templated conversations."""
    if model_cfg.name_or_path:
        return build_tokenizer(model_cfg, texts=[])
    columns = train_rows.column_names
    responses = [c for c in ("response_0", "response_1", "response") if c in columns]
    texts = [
        format_conversation(prompt, response)
        for column in responses
        for prompt, response in zip(train_rows["prompt"], train_rows[column], strict=True)
    ]
    return build_tokenizer(model_cfg, texts)


def gold_scores(
    data_cfg: DictConfig, prompts: list[str], responses: list[str], field: str
) -> list[float]:
    """The oracle's gold ``helpfulness`` or ``severity`` per response; NaN off the benchmark."""
    if data_cfg.source != "benchmark":
        return [math.nan] * len(responses)
    scores = benchmark.Oracle().score_batch(prompts, responses)
    return [float(getattr(score, field)) for score in scores]


def resolve_ckpt_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """``ckpt_path=last`` means this run dir's ``checkpoints/last.ckpt`` (rerun with the same
    ``hydra.run.dir`` to resume); any other value is a checkpoint file (a folder under
    ``trainer=fsdp``, one file per rank)."""
    if cfg.ckpt_path is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.exists():
        raise ConfigPathError(f"ckpt_path={cfg.ckpt_path!r}: no checkpoint at {path}")
    return str(path)


def trainer_arguments(trainer_cfg: DictConfig, *, networks_apart: bool = False) -> dict[str, Any]:
    """``cfg.trainer`` as ``pl.Trainer`` keyword arguments. ``strategy=fsdp`` is FSDP2
    (:class:`ShardedDataParallel`, with ``trainer.offload_frozen``); ``networks_apart`` says
    each network has its own backward pass (PPO), which leaves the others unused under DDP."""
    arguments = OmegaConf.to_container(trainer_cfg, resolve=True)
    offload_frozen = arguments.pop("offload_frozen")
    if arguments["strategy"] == "fsdp":
        arguments["strategy"] = ShardedDataParallel(offload_frozen=offload_frozen)
    elif arguments["strategy"] == "ddp" and networks_apart:
        arguments["strategy"] = DDPStrategy(find_unused_parameters=True)
    return arguments


def build_trainer(run: RunContext, task_cfg: DictConfig, callbacks: list[Callback]) -> pl.Trainer:
    """A Trainer from ``cfg.trainer`` (hardware) and the task's schedule and clipping."""
    return pl.Trainer(
        **trainer_arguments(run.cfg.trainer),
        max_epochs=task_cfg.max_epochs,
        gradient_clip_val=task_cfg.grad_clip,
        accumulate_grad_batches=task_cfg.accumulate_grad_batches,
        default_root_dir=run.run_dir,
        logger=run.logger if run.logger is not None else False,
        callbacks=[*callbacks, *run.callbacks],
        use_distributed_sampler=False,  # ShardedSampler shards without repeating examples
    )


# -- guards every fit runs with (saferlhf.cli.run adds them) ----------------------------------


def non_finite(values: Mapping[str, float]) -> dict[str, float]:
    """The entries of ``values`` that are NaN or infinite."""
    return {name: value for name, value in values.items() if not math.isfinite(value)}


def first_non_finite_parameter(modules: Iterable[nn.Module | None]) -> str | None:
    """The name of the first trainable parameter of ``modules`` that holds a NaN or an
    infinity, or None; frozen parameters cannot change and are skipped.

    One sum per parameter and one device sync: a NaN or an infinity makes the sum non-finite
    (the sum also overflows for weights near the float limit, which only a diverged run has),
    and a sum costs a tenth of an elementwise ``isfinite``."""
    named = [
        (name, parameter)
        for module in modules
        if module is not None
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    ]
    if not named:
        return None
    # A sharded parameter's local shard: the caller's all-rank decision covers the others.
    sums = torch.stack(
        [local_part(parameter.detach()).sum(dtype=torch.float32) for _, parameter in named]
    )
    finite = sums.isfinite()
    if finite.all():
        return None
    return named[int(finite.logical_not().nonzero()[0, 0])][0]


def non_finite_message(where: str, values: Mapping[str, float], parameter: str | None) -> str:
    found = [f"{name}={value}" for name, value in values.items()]
    if parameter is not None:
        found.append(f"weights of {parameter}")
    return (
        f"{where}: training went non-finite ({', '.join(found) or 'on another rank'}); the run "
        "stopped without writing a checkpoint or artifact from it (a lower learning rate may help)"
    )


def stop_if_non_finite(
    trainer: pl.Trainer,
    where: str,
    values: Mapping[str, float],
    modules: Iterable[nn.Module | None] = (),
) -> None:
    """Raise NonFiniteError, on every rank alike, when any rank's ``values`` or trainable
    weights of ``modules`` are NaN or infinite; ``where`` names the iteration or step."""
    bad_values = non_finite(values)
    bad_parameter = first_non_finite_parameter(modules)
    found = bool(bad_values) or bad_parameter is not None
    if trainer.strategy.reduce_boolean_decision(found, all=False):
        raise NonFiniteError(non_finite_message(where, bad_values, bad_parameter))


def training_position(trainer: pl.Trainer) -> str:
    return f"epoch {trainer.current_epoch + 1}, training step {trainer.global_step}"


class StopOnNonFinite(Callback):
    """Stop the fit when a training loss is not finite (one scalar a step) or when a checkpoint
    about to be written holds non-finite weights (checked before the file is written).
    Manually optimised tasks (PPO) check their own losses with :func:`stop_if_non_finite`."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            stop_if_non_finite(trainer, training_position(trainer), {"loss": loss.item()})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        stop_if_non_finite(trainer, training_position(trainer), {}, [pl_module])


class CheckpointOnSigterm(Callback):
    """Stop a fit on SIGTERM at the end of a training batch, every rank at the same batch,
    after saving the full state to ``path`` there, where the periodic checkpoints are taken
    too, so that ``ckpt_path=last`` resumes exactly.

    From the start of training the SIGTERM handler only notes the signal (and passes it on to
    the ranks this process started): Lightning's own handler broadcasts from inside the signal
    handler, which can meet a collective already in flight (an FSDP all-gather, a DDP
    all-reduce) and hang every rank. At the end of each batch the ranks agree whether any of
    them was signalled; if so they save, then all raise Lightning's SIGTERMException (a
    SystemExit with status 0) together. ``checkpoint`` names the checkpoint that resumes the
    fit: the one saved here, or the last one this fit wrote or resumed from."""

    def __init__(self, path: Path):
        self.path = path
        self.signalled = False
        self.saved = False
        self.fit_started = math.inf
        self.resumed_from: str | None = None
        self._trainer: pl.Trainer | None = None

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint that resumes this fit after a SIGTERM, None when there is none."""
        if self.saved:
            return self.path
        if self.path.exists() and (
            self.path.stat().st_mtime >= self.fit_started or self.resumed_from == str(self.path)
        ):
            return self.path
        return None

    def on_fit_start(self, trainer, pl_module):
        self.fit_started = time.time()
        self.resumed_from = trainer.ckpt_path

    def on_train_start(self, trainer, pl_module):
        # After Lightning has installed its handlers; it restores the original ones at teardown.
        self._trainer = trainer
        signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum, frame) -> None:
        if not self.signalled:
            self.signalled = True
            launcher = self._trainer.strategy.launcher if self._trainer is not None else None
            if launcher is not None:  # rank 0 started the other ranks: they must stop too
                launcher.kill(signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        if not self.saved:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved = True
        # Lightning raises SIGTERMException once this batch ends where its flag is set: set it
        # on every rank, so that none goes on to a collective the others never reach.
        trainer._signal_connector.received_sigterm = True


def gather_across_ranks(
    module: pl.LightningModule, batches: list[dict[str, torch.Tensor]], key: str
) -> torch.Tensor:
    """One epoch's values of ``key`` from this rank's ``batches`` and every other rank's,
    ``(n, ...)``; padding slots stay in, marked by their ``weight`` entries."""
    local = torch.cat([b[key] for b in batches])
    if module.trainer.world_size == 1:
        return local
    return module.all_gather(local).flatten(0, 1)  # (world, n, ...) -> (world * n, ...)


@dataclass
class FitResult:
    trainer: pl.Trainer
    metrics: dict[str, float]  # validation metrics of the best checkpoint
    best_checkpoint: str


def fit_and_validate_best(
    run: RunContext, module: pl.LightningModule, data: pl.LightningDataModule
) -> FitResult:
    """Fit ``module`` (resuming from ``ckpt_path`` when set) keeping the best checkpoint by
    ``task.monitor`` and a ``last.ckpt`` refreshed mid-epoch, then validate the best
    checkpoint, whose weights stay loaded in ``module``. With ``task.monitor_bound`` set the
    fit stops at the first validation that reaches it."""
    task = run.cfg.task
    checkpoints = run.run_dir / "checkpoints"
    best = ModelCheckpoint(
        dirpath=checkpoints, filename="best", monitor=task.monitor, mode=task.monitor_mode
    )
    last = ModelCheckpoint(
        dirpath=checkpoints,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=task.checkpoint_every_n_steps,
    )
    callbacks: list[Callback] = [best, last]
    if task.monitor_bound is not None:
        callbacks.append(StopAtBound(task.monitor, task.monitor_mode, task.monitor_bound))
    trainer = build_trainer(run, task, callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=resolve_ckpt_path(run.cfg, run.run_dir))
    (metrics,) = trainer.validate(
        module, datamodule=data, ckpt_path=best.best_model_path, verbose=False
    )
    metrics = {name: float(value) for name, value in metrics.items()}
    return FitResult(trainer, metrics, best.best_model_path)


class StopAtBound(Callback):
    """Stop the fit once ``monitor`` reaches ``bound``, its best possible value (1.0 for an
    accuracy): the best checkpoint keeps the first epoch of a tie, so no later epoch could be
    picked, and the fit ends with the same best checkpoint it would have picked anyway."""

    def __init__(self, monitor: str, mode: str, bound: float):
        self.monitor, self.bound = monitor, bound
        self.reached = (
            (lambda value: value >= bound) if mode == "max" else (lambda value: value <= bound)
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if not fitting or value is None or not self.reached(float(value)):
            return
        log.info(
            "%s reached %s, its best possible value, at %s: stopping, as no later epoch could "
            "be picked", self.monitor, self.bound, training_position(trainer),
        )  # fmt: skip
        trainer.should_stop = True


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_with_schedule(
    module: pl.LightningModule,
    params,
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
    steps_per_epoch: int,
) -> dict:
    """AdamW with warmup + cosine over the whole fit, stepped every optimizer step."""
    trainer = module.trainer
    total = math.ceil(steps_per_epoch / trainer.accumulate_grad_batches) * trainer.max_epochs
    warmup = max(1, int(warmup_ratio * total))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, warmup, total)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def export_artifact(
    trainer: pl.Trainer,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
) -> PreTrainedModel | None:
    """Write ``model`` as a plain Hugging Face folder from rank 0 and return the plain model
    written there (None on other ranks); a sharded model's full state is gathered once, from
    every rank, so every rank must call this."""
    plain = unsharded_copy(model, trainer.is_global_zero)
    if trainer.is_global_zero:
        save_artifact(plain, tokenizer, directory)
    return plain
