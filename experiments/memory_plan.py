"""Per-rank GPU memory of PPO-Lagrangian for a model size, strategy and memory savers.

An estimate from the architecture alone (``saferlhf/memory_plan.py`` states what it counts);
nothing is loaded or run. One configuration prints a table of the six model instances:

    .venv/bin/python experiments/memory_plan.py --preset 7b --strategy fsdp --gradient-checkpointing

``--table`` prints the README table (every preset under a few configurations on 8 cards) and
writes it to ``experiments/results/memory_plan.json``:

    .venv/bin/python experiments/memory_plan.py --table

The workload defaults are the project's for pretrained models (``algo=safe_rlhf`` with
``model=alpaca_7b_reproduced``), read from ``conf/``: ``algo.rollout_batch_size`` prompts and
``algo.minibatch_size`` training rows per rank, ``model.max_length`` tokens of which
``eval.sampling.max_new_tokens`` generated, prompts padded to the rest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from saferlhf import CONF_DIR
from saferlhf.memory_plan import (
    GIB,
    KINDS,
    PRESETS,
    STRATEGIES,
    MemoryPlan,
    Setup,
    Workload,
    causal_lm_parameters,
    plan_memory,
    preset,
)

RESULTS = Path(__file__).parent / "results" / "memory_plan.json"
CARD_GIB = 79.6  # an 80 GB H100 as nvidia-smi reports it (81,559 MiB)
TABLE_LORA_RANK = 16


def project_workload() -> Workload:
    """The PPO workload of the project's pretrained presets, from conf/."""
    algo = OmegaConf.load(CONF_DIR / "algo" / "ppo.yaml")
    max_length = OmegaConf.load(CONF_DIR / "model" / "base" / "pretrained.yaml").max_length
    generated = OmegaConf.load(CONF_DIR / "eval" / "default.yaml").sampling.max_new_tokens
    return Workload(algo.rollout_batch_size, max_length - generated, generated, algo.minibatch_size)


def table_setups(world_size: int) -> dict[str, Setup]:
    """The README table's rows: each adds a memory saver, LoRA last."""
    fsdp = dict(world_size=world_size, strategy="fsdp")
    return {
        "DDP, full fine-tune": Setup(world_size, "ddp"),
        "FSDP, full fine-tune": Setup(**fsdp),
        "FSDP + checkpointing": Setup(**fsdp, gradient_checkpointing=True),
        "FSDP + checkpointing + frozen offload": Setup(
            **fsdp, gradient_checkpointing=True, offload_frozen=True
        ),
        f"FSDP + LoRA r={TABLE_LORA_RANK}": Setup(**fsdp, lora_rank=TABLE_LORA_RANK),
        f"FSDP + checkpointing + frozen offload + LoRA r={TABLE_LORA_RANK}": Setup(
            **fsdp, gradient_checkpointing=True, offload_frozen=True, lora_rank=TABLE_LORA_RANK
        ),
    }


def preset_label(name: str) -> str:
    arch = PRESETS[name]
    return f"{name.upper()} ({arch.name}, {causal_lm_parameters(arch) / 1e9:.2f}B)"


def print_plan(plan: MemoryPlan, card_gib: float) -> None:
    header = ["instance", *KINDS, "busiest phase"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, memory in plan.instances.items():
        cells = [f"{getattr(memory, kind) / GIB:.2f}" for kind in KINDS]
        print(" | ".join([name, *cells, memory.peak_phase]))
    kinds = plan.kind_bytes()
    totals = [f"{kinds[kind] / GIB:.2f}" for kind in KINDS]
    print(" | ".join([f"total (transient kinds: {plan.busiest}'s)", *totals, ""]))
    fits = "fits" if plan.total_gib <= card_gib else "does not fit"
    print(f"\n{plan.total_gib:.1f} GiB per rank: {fits} on a {card_gib} GiB card")


def print_table(setups: dict[str, Setup], workload: Workload, card_gib: float) -> dict:
    """The markdown table, one row per setup and a column per preset; returns its JSON."""
    header = ["configuration", *(preset_label(name) for name in PRESETS)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for label, setup in setups.items():
        cells, plans = [], {}
        for name in PRESETS:
            plan = plan_memory(PRESETS[name], setup, workload)
            fits = plan.total_gib <= card_gib
            cells.append(f"{plan.total_gib:.1f} {'✓' if fits else '✗'}")
            plans[name] = plan.to_dict() | {"fits": fits}
        print("| " + " | ".join([label, *cells]) + " |")
        rows.append({"configuration": label, "plans": plans})
    return {"card_gib": card_gib, "workload": vars(workload), "rows": rows}


def main() -> None:
    defaults = project_workload()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="7b", help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--world-size", type=int, default=8, help="ranks (GPUs)")
    parser.add_argument("--strategy", default="fsdp", help=f"one of {STRATEGIES}")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tune")
    parser.add_argument("--offload-frozen", action="store_true", help="frozen models on CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--rollout-batch", type=int, default=defaults.rollout_batch)
    parser.add_argument("--prompt-length", type=int, default=defaults.prompt_length)
    parser.add_argument("--generation-length", type=int, default=defaults.generation_length)
    parser.add_argument("--micro-batch", type=int, default=defaults.micro_batch)
    parser.add_argument("--card-gib", type=float, default=CARD_GIB, help="GPU memory per rank")
    parser.add_argument("--table", action="store_true", help="every preset, the README's setups")
    parser.add_argument("--json", type=Path, help=f"write the result (--table: {RESULTS})")
    args = parser.parse_args()

    workload = Workload(
        args.rollout_batch, args.prompt_length, args.generation_length, args.micro_batch
    )
    try:
        if args.table:
            result = print_table(table_setups(args.world_size), workload, args.card_gib)
            path = args.json or RESULTS
        else:
            setup = Setup(
                args.world_size,
                args.strategy,
                args.lora_rank,
                args.offload_frozen,
                args.gradient_checkpointing,
            )
            plan = plan_memory(preset(args.preset), setup, workload)
            print_plan(plan, args.card_gib)
            result = plan.to_dict() | {"card_gib": args.card_gib}
            path = args.json
    except ValueError as error:  # a bad flag: one line, not a traceback
        parser.error(str(error))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
