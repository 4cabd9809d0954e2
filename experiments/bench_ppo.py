"""PPO iteration time: saferlhf's ``task=ppo`` side by side with TRL 1.12's PPOTrainer (CPU).

Builds ONE set of tiny *untrained* artifacts in a temp dir (a byte-level BPE tokenizer trained on
the embedded benchmark text, a Llama-shaped policy and a reward model from ``conf/model/tiny.yaml``;
the value/critic is initialised from the reward folder on both sides), then runs the same work
through both frameworks in this process:

* saferlhf: the real ``saferlhf task=ppo preference=single`` (composed from the config tree and run
  with :func:`saferlhf.cli.run`); per-iteration times come from ``ppo_history.json``
  (``time/generation + time/scoring + time/update``). A Lightning callback also records each
  training step's wall time (which adds decoding, gold metrics and logging).
* TRL: ``trl.experimental.ppo.PPOTrainer`` with the same models (loaded from the same folders), the
  same prompt batches in the same order (same token ids, left padded), fixed-length generation of
  T new tokens, the same PPO epochs and minibatch size. Each step is timed between consecutive
  ``on_step_end`` callbacks (the first from ``on_train_begin``): it is TRL's whole step.

The first W iterations of each are dropped; the script prints the medians, saferlhf's split into
generation / scoring / update and the ratio TRL / saferlhf, and writes
``experiments/results/bench_ppo_cpu.json``. TRL is an optional dependency, kept out of the project
venv::

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 \\
        && /tmp/trlvenv/bin/pip install -e '.[bench]'
    OMP_NUM_THREADS=1 /tmp/trlvenv/bin/python experiments/bench_ppo.py --iterations 5 --warmup 2

Without TRL installed it measures saferlhf alone and says that the TRL half is missing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_ppo_cpu.json"
SEED = 0


# -- shared setup ------------------------------------------------------------------------------


def compose_cfg(*overrides: str):
    """The real config tree with shell-style overrides."""
    from hydra import compose, initialize_config_dir

    from saferlhf import CONF_DIR
    from saferlhf.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def build_artifacts(root: Path) -> dict[str, Path]:
    """Tiny untrained ``policy`` and ``reward`` folders (``model=tiny``), one shared tokenizer."""
    from saferlhf.data import views
    from saferlhf.data.benchmark import generate_benchmark
    from saferlhf.data.collate import format_conversation
    from saferlhf.models import (
        build_causal_lm,
        build_score_model,
        save_artifact,
        train_bpe_tokenizer,
    )

    model_cfg = compose_cfg("model=tiny").model
    rows = generate_benchmark(1000, 0, seed=0, label_noise=0.0, benign_fraction=0.35)["train"]
    texts = [format_conversation(i.prompt, i.response) for i in views.qa_items(rows)]
    tokenizer = train_bpe_tokenizer(
        texts, model_cfg.tokenizer.vocab_size, model_cfg.tokenizer.min_frequency
    )
    torch.manual_seed(SEED)
    paths = {"policy": root / "policy", "reward": root / "reward"}
    save_artifact(build_causal_lm(model_cfg, tokenizer), tokenizer, paths["policy"])
    torch.manual_seed(SEED + 1)
    save_artifact(build_score_model(model_cfg, tokenizer), tokenizer, paths["reward"])
    return paths


def saferlhf_overrides(args, paths: dict[str, Path]) -> list[str]:
    return [
        "task=ppo",
        "preference=single",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "num_threads=1",
        f"seed={SEED}",
        f"init.policy={paths['policy']}",
        f"init.reward={paths['reward']}",
        f"algo.iterations={args.iterations + args.warmup}",
        f"algo.rollout_batch_size={args.batch}",
        f"algo.minibatch_size={args.minibatch}",
        f"algo.ppo_epochs={args.epochs}",
        f"algo.sampling.max_new_tokens={args.new_tokens}",
        f"task.eval_prompts={args.batch}",  # the before/after evaluation is not timed; keep it small
        f"task.checkpoint_every={args.iterations + args.warmup + 1}",
    ]


def prompt_batches(cfg, tokenizer, iterations: int, batch: int) -> list[list[list[int]]]:
    """The prompt token ids of each of saferlhf's PPO batches, in its order (the same data,
    tokenisation, truncation and seeded permutation as ``PromptDataModule`` on one rank)."""
    from saferlhf.data import views
    from saferlhf.data.collate import tokenize_prompts
    from saferlhf.data.sources import load_data

    prompts = views.prompts(load_data(cfg.data).splits["train"])
    ids = tokenize_prompts(
        tokenizer, prompts, cfg.model.max_length - cfg.algo.sampling.max_new_tokens
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    while len(order) < iterations * batch:
        order += torch.randperm(len(prompts), generator=generator).tolist()
    return [[ids[i] for i in order[k * batch : (k + 1) * batch]] for k in range(iterations)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- saferlhf ------------------------------------------------------------------------------------


def run_saferlhf(args, paths: dict[str, Path], run_dir: Path) -> dict:
    """N + W iterations of the real ``saferlhf task=ppo preference=single``."""
    from pytorch_lightning.callbacks import Callback

    import saferlhf.tasks.ppo as ppo
    from saferlhf.cli import run

    class StepWall(Callback):
        """Wall time of each whole training step (one PPO iteration)."""

        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.started)

    # Record the generated width (saferlhf stops when every row has ended) and the padded
    # prompt width of each training rollout; the wrapper only reads shapes.
    widths: list[tuple[int, int]] = []
    original = ppo.sample_responses

    def recording(actor, tokenizer, prompt_ids, **kwargs):
        rollout = original(actor, tokenizer, prompt_ids, **kwargs)
        widths.append((rollout.prompt_width, rollout.responses.shape[1]))
        return rollout

    wall = StepWall()
    cfg = compose_cfg(*saferlhf_overrides(args, paths))
    ppo.sample_responses = recording
    try:
        run(cfg, run_dir, callbacks=[wall])
    finally:
        ppo.sample_responses = original
    # The first and last len(eval) // batch calls are the untimed before/after evaluations.
    n_eval = -(-cfg.task.eval_prompts // ppo.EVAL_BATCH)
    train_widths = widths[n_eval : len(widths) - n_eval]

    history = json.loads((run_dir / "ppo_history.json").read_text())
    keep = slice(args.warmup, None)
    parts = {
        name: [h[f"time/{name}"] for h in history][keep]
        for name in ("generation", "scoring", "update")
    }
    totals = [sum(p) for p in zip(*parts.values(), strict=True)]
    return {
        "iteration_s": totals,
        "median_iteration_s": median(totals),
        "median_split_s": {name: median(values) for name, values in parts.items()},
        "step_wall_s": wall.times[keep],
        "median_step_wall_s": median(wall.times[keep]),
        "mean_response_length": [h["rollout/response_length"] for h in history][keep],
        "prompt_width": [w[0] for w in train_widths][keep],
        "generated_width": [w[1] for w in train_widths][keep],
        "stopped_early_at_eos": any(w[1] < args.new_tokens for w in train_widths),
    }


# -- TRL -----------------------------------------------------------------------------------------


def run_trl(args, paths: dict[str, Path], batches: list[list[list[int]]], out_dir: Path) -> dict:
    """The same work through TRL 1.12's PPOTrainer, each step timed by a callback."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from saferlhf.models import load_tokenizer

    algo = compose_cfg("algo=ppo").algo
    steps = args.iterations + args.warmup

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_begin(self, a, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    tokenizer = load_tokenizer(str(paths["policy"]))
    tokenizer.padding_side = "left"  # TRL generates from left-padded queries
    rows = [ids for batch in batches for ids in batch]
    dataset = Dataset.from_dict({"input_ids": rows})
    config = PPOConfig(
        output_dir=str(out_dir),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # PPOConfig defaults to bf16; saferlhf's tiny runs are float32
        seed=SEED,
        per_device_train_batch_size=args.batch,  # one rollout of B; the update's micro-batch is
        gradient_accumulation_steps=1,  # capped at the minibatch, so one optimizer step each
        num_mini_batches=args.batch // args.minibatch,
        local_rollout_forward_batch_size=args.batch,  # generate and score the batch at once
        num_ppo_epochs=args.epochs,
        total_episodes=steps * args.batch,
        response_length=args.new_tokens,
        stop_token=None,  # fixed-length generation of T tokens
        temperature=algo.sampling.temperature,
        num_sample_generations=0,
        learning_rate=algo.actor_lr,
        kl_coef=algo.kl_coef,
        cliprange=algo.clip_range,
        cliprange_value=algo.value_clip_range,
        gamma=algo.gamma,
        lam=algo.gae_lambda,
        logging_steps=1,
        disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
        ref_model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
        reward_model=AutoModelForSequenceClassification.from_pretrained(paths["reward"]),
        value_model=AutoModelForSequenceClassification.from_pretrained(paths["reward"]),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(args.batch)),
        callbacks=[timer],
    )
    # TRL shuffles its prompts; feed it saferlhf's batches in saferlhf's order instead.
    trainer.dataloader = DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=False,
        collate_fn=DataCollatorWithPadding(tokenizer),
        drop_last=True,
    )
    trainer.train()
    times = timer.times[args.warmup :]
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    return {
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "policy_dtype": str(policy.dtype),
        # PPOConfig defaults gradient_checkpointing=True, but PPOTrainer.train never enables it
        "policy_gradient_checkpointing": bool(policy.is_gradient_checkpointing),
        "iteration_s": times,
        "median_iteration_s": median(times),
        "steps_run": len(timer.times),
        "prompt_width": [max(len(ids) for ids in batch) for batch in batches][args.warmup :],
    }


# -- main ----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "pytorch-lightning", "trl", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=5, help="timed PPO iterations (N)")
    parser.add_argument("--warmup", type=int, default=2, help="dropped first iterations (W)")
    parser.add_argument("--batch", type=int, default=64, help="rollout batch size (B)")
    parser.add_argument("--new-tokens", type=int, default=48, help="response length (T)")
    parser.add_argument("--epochs", type=int, default=2, help="PPO epochs (E)")
    parser.add_argument("--minibatch", type=int, default=32, help="PPO minibatch size (M)")
    parser.add_argument("--skip-trl", action="store_true", help="measure saferlhf only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.batch % args.minibatch:
        parser.error("--batch must be a multiple of --minibatch")
    torch.set_num_threads(1)

    result: dict = {
        "config": {
            "iterations": args.iterations,
            "warmup": args.warmup,
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "ppo_epochs": args.epochs,
            "minibatch": args.minibatch,
            "model": "conf/model/tiny.yaml (untrained), float32",
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "versions": versions(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        root = Path(tmp)
        paths = build_artifacts(root / "artifacts")
        print(f"saferlhf: {args.warmup} + {args.iterations} PPO iterations ...", flush=True)
        result["saferlhf"] = run_saferlhf(args, paths, root / "saferlhf_run")
        trl_missing = None
        if args.skip_trl:
            trl_missing = "--skip-trl"
        else:
            try:
                import trl.experimental.ppo  # noqa: F401
            except ImportError as error:
                trl_missing = f"TRL's PPOTrainer is not importable: {error}"
        if trl_missing is None:
            from saferlhf.models import load_tokenizer

            cfg = compose_cfg(*saferlhf_overrides(args, paths))
            batches = prompt_batches(
                cfg, load_tokenizer(str(paths["policy"])), args.iterations + args.warmup, args.batch
            )
            print(f"TRL: {args.warmup} + {args.iterations} PPO steps ...", flush=True)
            result["trl"] = run_trl(args, paths, batches, root / "trl_run")
            result["ratio_trl_over_saferlhf"] = (
                result["trl"]["median_iteration_s"] / result["saferlhf"]["median_iteration_s"]
            )
            result["ratio_trl_over_saferlhf_step_wall"] = (
                result["trl"]["median_iteration_s"] / result["saferlhf"]["median_step_wall_s"]
            )
        else:
            result["trl"] = {"missing": trl_missing}

    report(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


def report(result: dict) -> None:
    c, s, t = result["config"], result["saferlhf"], result["trl"]
    print(
        f"\nB={c['batch']} T={c['new_tokens']} E={c['ppo_epochs']} M={c['minibatch']}, "
        f"median over {c['iterations']} iterations after {c['warmup']} warm-up, "
        f"{c['torch_threads']} torch thread(s)"
    )
    split = s["median_split_s"]
    print(
        f"saferlhf  {s['median_iteration_s']:.3f} s/iteration  (generation {split['generation']:.3f}"
        f" + scoring {split['scoring']:.3f} + update {split['update']:.3f});"
        f" whole training step {s['median_step_wall_s']:.3f} s"
    )
    print(
        f"          generated widths {s['generated_width']} of T={c['new_tokens']}"
        f" (stopped early at EOS: {s['stopped_early_at_eos']}),"
        f" mean response length {[round(x, 1) for x in s['mean_response_length']]}"
    )
    if "missing" in t:
        print(f"TRL       MISSING: {t['missing']}", file=sys.stderr)
        return
    print(
        f"TRL       {t['median_iteration_s']:.3f} s/step  ({t['steps_run']} steps run;"
        f" {t['policy_dtype']}, mixed precision {t['mixed_precision']},"
        f" gradient checkpointing {t['policy_gradient_checkpointing']})"
    )
    print(
        f"ratio TRL/saferlhf  {result['ratio_trl_over_saferlhf']:.2f}x"
        f"  (against saferlhf's whole training step: "
        f"{result['ratio_trl_over_saferlhf_step_wall']:.2f}x)"
    )


if __name__ == "__main__":
    main()
