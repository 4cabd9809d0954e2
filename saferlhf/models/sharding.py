"""Sharded data parallelism (FSDP2, ``trainer.strategy=fsdp``): every model of a stage, frozen
ones included, sharded per decoder layer over all ranks.

The strategy is Lightning's ``ModelParallelStrategy`` with one data-parallel dimension: it hands
each LightningModule the device mesh in ``configure_model``, where :func:`shard_modules` calls
``fully_shard`` per model. Lightning's ``FSDPStrategy`` wraps the whole LightningModule in one
FSDP1 unit of flat parameters, which cannot give PPO-Lagrangian's actor, critics and frozen
models their own units and optimizers; FSDP2 shards each parameter as a DTensor, so every
model is its own unit and the optimizers see ordinary parameters.

What sharding changes for the code that runs the models:

- forwards run under ``no_grad``, not ``inference_mode`` (FSDP's all-gather hooks create
  tensors that inference mode forbids): :func:`inference_context`;
- decoding gathers the actor's weights once and keeps them for every step, instead of one
  all-gather per layer per generated token, and frees them after (:func:`decoding_weights`);
- artifacts are written from the full state, gathered once onto rank 0 (:func:`unsharded_copy`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from pytorch_lightning import LightningModule
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel


class ShardedDataParallel(ModelParallelStrategy):
    """FSDP2 over every rank (no tensor parallelism); checkpoints are sharded folders, one file
    per rank, that resume exactly. ``offload_frozen`` keeps the frozen models' shards in CPU
    memory, copied to the device layer by layer as they run."""

    def __init__(self, offload_frozen: bool = False):
        super().__init__(save_distributed_checkpoint=True)
        self.offload_frozen = offload_frozen

    def setup_environment(self) -> None:
        # Lightning's default splits a node's devices into tensor-parallel groups.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def is_sharded(model: nn.Module | None) -> bool:
    return isinstance(model, FSDPModule)


def _sharding_units(model: PreTrainedModel) -> list[nn.Module]:
    """The submodules that become FSDP units of their own before the model itself: each decoder
    layer (``_no_split_modules`` names their classes) and, for a score model, its backbone and
    head, which the PPO critics' per-token values call apart (:func:`token_values`)."""
    layer_classes = set(model._no_split_modules or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules): it "
            "cannot be sharded per layer"
        )
    score_head = getattr(model, "score", None)
    if isinstance(score_head, nn.Module):
        return [*layers, getattr(model, model.base_model_prefix), score_head]
    return layers


def shard_for_strategy(
    module: LightningModule,
    trained: Iterable[PreTrainedModel | None],
    frozen: Iterable[PreTrainedModel | None] = (),
) -> None:
    """``configure_model``'s body for every stage: shard the models when the Trainer runs
    :class:`ShardedDataParallel`, leave them as they are under any other strategy."""
    strategy = module.trainer.strategy
    if isinstance(strategy, ShardedDataParallel):
        mesh = strategy.device_mesh["data_parallel"]
        shard_modules(trained, frozen, mesh=mesh, offload_frozen=strategy.offload_frozen)


def shard_modules(
    trained: Iterable[PreTrainedModel | None],
    frozen: Iterable[PreTrainedModel | None] = (),
    *,
    mesh,
    offload_frozen: bool = False,
) -> None:
    """``fully_shard`` each model per layer over ``mesh`` (``configure_model`` runs again for
    every fit, validate and test: a sharded model is left as it is)."""
    cpu, stay = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()), OffloadPolicy()
    models = [(m, stay, False) for m in trained]
    models += [(m, cpu if offload_frozen else stay, True) for m in frozen]
    for model, offload, is_frozen in models:
        if model is None or is_sharded(model):
            continue
        for unit in _sharding_units(model):
            fully_shard(unit, mesh=mesh, offload_policy=offload)
        fully_shard(model, mesh=mesh, offload_policy=offload)
        if is_frozen:
            # FSDP keeps a root's own weights (embeddings, LM head) gathered from forward until
            # backward reshards them; a frozen model has no backward, so reshard after forward.
            model.set_reshard_after_forward(True)


def inference_context(*models: nn.Module | None) -> contextlib.AbstractContextManager:
    """``inference_mode`` (cheaper per op, which adds up when decoding), or ``no_grad`` where a
    model is sharded: FSDP's all-gathers write tensors that inference mode forbids."""
    return torch.no_grad() if any(map(is_sharded, models)) else torch.inference_mode()


@contextlib.contextmanager
def decoding_weights(model: nn.Module, gather_all: bool) -> Iterator[None]:
    """A sharded trained ``model``'s weights while it decodes, freed afterwards. ``gather_all``
    gathers every layer once and keeps it for all the steps; otherwise each layer is gathered
    at each step and freed after it (one layer's memory at a time, one all-gather per layer per
    generated token)."""
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if gather_all:
        model.set_reshard_after_forward(False)
        for unit in units:
            unit.unshard()
    try:
        yield
    finally:
        for unit in units:  # the root's weights too, which no backward will reshard now
            unit.reshard()
        if gather_all:  # back to fully_shard's: layers reshard after forward, the root not
            model.set_reshard_after_forward(True)
            model.set_reshard_after_forward(False, recurse=False)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def unsharded_copy(model: PreTrainedModel, is_global_zero: bool) -> PreTrainedModel | None:
    """A plain (unsharded, CPU) copy of ``model`` with its full weights on rank 0 and None on
    the other ranks; ``model`` itself when it is not sharded. Every rank must call it: the
    weights are gathered from all of them."""
    if not is_sharded(model):
        return model
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not is_global_zero:
        return None
    # fully_shard swaps the model's class for a subclass of it and FSDPModule.
    plain_class = next(
        c
        for c in type(model).__mro__
        if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule)
    )
    dtype = next(iter(state.values())).dtype
    copy = plain_class(model.config).to(dtype)
    copy.load_state_dict(state)
    if getattr(model, "generation_config", None) is not None:  # score models have none
        copy.generation_config = model.generation_config
    return copy
