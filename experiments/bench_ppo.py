"""PPO iteration time: saferlhf's ``task=ppo`` side by side with TRL 1.12's PPOTrainer.

Builds ONE set of *untrained* artifacts in a temp dir (a byte-level BPE tokenizer trained on the
embedded benchmark text, a Llama-shaped policy and a reward model; the value/critic is
initialised from the reward folder on both sides), then runs the same work through both
frameworks, saferlhf in this process and TRL in a fresh child process:

* saferlhf: the real ``saferlhf task=ppo preference=single`` (composed from the config tree and run
  with :func:`saferlhf.cli.run`); per-iteration times come from ``ppo_history.json``
  (``time/generation + time/scoring + time/update``). A Lightning callback also records each
  training step's wall time (which adds decoding, gold metrics and logging).
* TRL: ``trl.experimental.ppo.PPOTrainer`` with the same models (loaded from the same folders), the
  same prompt batches in the same order (same token ids, left padded), fixed-length generation of
  T new tokens, the same PPO epochs and minibatch size. Each step is timed between consecutive
  ``on_step_end`` callbacks (the first from ``on_train_begin``): it is TRL's whole step.

Presets: ``tiny`` (``conf/model/tiny.yaml``, float32; the CPU figure), ``0.5b`` and ``1.5b``
(randomly initialised Llama-shaped models of 0.47B and 1.57B parameters, 32k vocabulary, bf16
weights on both sides; ``--device cuda``). ``--variants`` adds saferlhf runs with other settings: decoding with or
without ``torch.compile`` (``compiled``, ``eager``; the default compiles it on CUDA only),
length-bucketed minibatches (``bucketed``), a LoRA actor (``lora``), gradient
checkpointing (``checkpointing``), scoring and update on padded rows (``padded``; the
default packs them), the update's actor log-probs 1024 tokens at a time (``chunked_logprob``) or through
liger-kernel's fused linear cross-entropy where it is installed (``fused_logprob_liger``, CUDA only, otherwise skipped
with the reason), FSDP2 on the one device with the actor gathered once per rollout (``fsdp``)
or layer by layer at every decoding step (``fsdp_layerwise``); on CUDA all but ``bucketed``
and ``compiled`` by default, while
``--budget-s`` lasts. Each run reports generation
tokens/s and samples/s, and decoding's fraction of the memory-bandwidth limit (the weight bytes
one decoding step reads, over a measured copy bandwidth, give the most steps per second, each
``B`` tokens); on CUDA also peak GPU memory and the fraction of the step's FLOP limit (model
FLOPs of the iteration over its time x a measured bf16 matmul peak), whole and by phase.

The first W iterations of each run are dropped; the script prints the medians, saferlhf's split
into generation / scoring / update and the ratio TRL / saferlhf. saferlhf's default run and TRL's
run alternate ``--pairs`` times (3 on CPU: the shared cores drift by about 10% between minutes);
the ratio is the median of the back-to-back pairs' ratios. It writes
``experiments/results/bench_ppo_<device>.json`` (after every run, so a cut-off run keeps its
figures). TRL is an optional dependency, kept out of the project venv::

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 \\
        && /tmp/trlvenv/bin/pip install -e '.[bench]'
    OMP_NUM_THREADS=1 /tmp/trlvenv/bin/python experiments/bench_ppo.py --iterations 5 --warmup 2
    python experiments/bench_ppo.py --device cuda --preset 0.5b   # one GPU, under 6 minutes

Without TRL installed it measures saferlhf alone and says that the TRL half is missing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0

# The 0.5b preset: Llama-2-shaped blocks, 24 x (4 h^2 + 3 h i) + 2 x 32k x h = 0.47B parameters.
ARCH_05B = dict(
    model_type="llama",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    vocab_size=32000,  # the benchmark tokenizer uses the first ~1k ids; decoding skips the rest
)
# The 1.5b preset: 28 x (4 h^2 + 3 h i) + 2 x 32k x h = 1.57B parameters.
ARCH_15B = ARCH_05B | dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=16,
)  # fmt: skip
ARCHS = {"0.5b": ARCH_05B, "1.5b": ARCH_15B}
PRESETS = {
    "tiny": dict(batch=64, new_tokens=48, epochs=2, minibatch=32),
    "0.5b": dict(batch=64, new_tokens=128, epochs=2, minibatch=32),
    "1.5b": dict(batch=64, new_tokens=128, epochs=2, minibatch=16),
}
SAFERLHF_VARIANTS = {  # name -> extra overrides
    "default": [],  # on CUDA: compiled decoding (algo.compile_generation=null)
    "eager": ["algo.compile_generation=false"],
    "compiled": ["algo.compile_generation=true"],  # on CPU: needs a C++ compiler for inductor
    "bucketed": ["algo.length_bucketing=true"],
    "lora": ["algo.lora_rank=16"],
    "checkpointing": ["algo.gradient_checkpointing=true"],
    "padded": ["algo.packed_rollouts=false"],
    # 1024 tokens of a 32k vocabulary: 128 MiB of float32 logits at a time instead of a whole
    # minibatch's (32 rows x ~160 tokens: 650 MiB, and as much again for their gradient)
    "chunked_logprob": ["algo.logprob_chunk=1024"],
    # the same path with liger-kernel's fused linear cross-entropy in place of saferlhf's
    # checkpointed chunks (patched in by run_saferlhf; liger is not a saferlhf dependency)
    "fused_logprob_liger": ["algo.logprob_chunk=1024"],
    # FSDP2 on this one device: the sharded code path's cost where nothing is split; the actor
    # gathered once per rollout, or each layer at every decoding step
    "fsdp": ["trainer.strategy=fsdp"],
    "fsdp_layerwise": ["trainer.strategy=fsdp", "algo.gather_actor_for_decoding=false"],
}

DEFAULT_VARIANTS = {
    "cpu": "default",
    "cuda": (
        "default,padded,chunked_logprob,fused_logprob_liger,fsdp,fsdp_layerwise,checkpointing,"
        "lora,eager"
    ),
}
# reduction="none" gets correct weight gradients from this version on (Liger-Kernel PR 1298)
LIGER_MIN_VERSION = (0, 8, 2)

# -- shared setup ------------------------------------------------------------------------------


def compose_cfg(*overrides: str):
    """The real config tree with shell-style overrides."""
    from hydra import compose, initialize_config_dir

    from saferlhf import CONF_DIR
    from saferlhf.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def build_artifacts(root: Path, preset: str, device: str) -> dict[str, Path]:
    """Untrained ``policy`` and ``reward`` folders sharing one tokenizer: ``model=tiny`` in
    float32, or a larger preset in bf16 (initialised on ``device``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

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
    paths = {"policy": root / "policy", "reward": root / "reward"}
    if preset == "tiny":
        torch.manual_seed(SEED)
        save_artifact(build_causal_lm(model_cfg, tokenizer), tokenizer, paths["policy"])
        torch.manual_seed(SEED + 1)
        save_artifact(build_score_model(model_cfg, tokenizer), tokenizer, paths["reward"])
        return paths
    arch = dict(ARCHS[preset])
    config = AutoConfig.for_model(
        arch.pop("model_type"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
        **arch,
    )
    with torch.device(device):
        torch.manual_seed(SEED)
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        save_artifact(policy, tokenizer, paths["policy"])
        del policy
        torch.manual_seed(SEED + 1)
        reward = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
        save_artifact(reward, tokenizer, paths["reward"])
    return paths


def saferlhf_overrides(args, paths: dict[str, Path], variant: str = "default") -> list[str]:
    overrides = [
        "task=ppo",
        "preference=single",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"seed={SEED}",
        f"init.policy={paths['policy']}",
        f"init.reward={paths['reward']}",
        f"algo.iterations={args.iterations + args.warmup}",
        f"algo.rollout_batch_size={args.batch}",
        f"algo.minibatch_size={args.minibatch}",
        f"algo.ppo_epochs={args.epochs}",
        f"eval.sampling.max_new_tokens={args.new_tokens}",
        # prompts are at most ~32 tokens; this leaves them room and fixes the compiled width
        f"model.max_length={args.new_tokens + 64}",
        f"eval.num_prompts={args.batch}",  # the before/after evaluation is not timed; keep it small
        f"task.checkpoint_every={args.iterations + args.warmup + 1}",
        *SAFERLHF_VARIANTS[variant],
    ]
    if args.device == "cuda":
        overrides += ["trainer=gpu", "trainer.precision=bf16-true"]
    else:
        overrides += ["num_threads=1"]
    return overrides


def prompt_batches(cfg, tokenizer, iterations: int, batch: int) -> list[list[list[int]]]:
    """The prompt token ids of each of saferlhf's PPO batches, in its order (the same data,
    tokenisation, truncation and seeded permutation as ``PromptDataModule`` on one rank)."""
    from saferlhf.data import views
    from saferlhf.data.collate import tokenize_prompts
    from saferlhf.data.sources import load_data

    prompts = views.prompts(load_data(cfg.data).splits["train"])
    ids = tokenize_prompts(
        tokenizer, prompts, cfg.model.max_length - cfg.eval.sampling.max_new_tokens
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    while len(order) < iterations * batch:
        order += torch.randperm(len(prompts), generator=generator).tolist()
    return [[ids[i] for i in order[k * batch : (k + 1) * batch]] for k in range(iterations)]


def liger_unavailable(device: str) -> str | None:
    """Why the ``fused_logprob_liger`` variant cannot run here, or None when it can."""
    from importlib.metadata import PackageNotFoundError, version

    if device != "cuda":
        return "liger-kernel's Triton kernels run on CUDA only"
    try:
        installed = version("liger-kernel")
    except PackageNotFoundError:
        return "liger-kernel is not installed (pip install 'liger-kernel>=0.8.2')"
    release = tuple(int(part) for part in installed.split(".")[:3] if part.isdigit())
    if release < LIGER_MIN_VERSION:
        return f"liger-kernel {installed}: needs 0.8.2 or later for per-token gradients"
    return None


def liger_token_log_probs(
    hidden: torch.Tensor, head_weight: torch.Tensor, index: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """``saferlhf.losses.chunked_token_log_probs`` through liger-kernel's fused linear
    cross-entropy, which picks its own chunks (``chunk_tokens`` only routes the update here)
    and computes each chunk's gradient in the forward pass instead of recomputing it."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(hidden, head_weight, index, reduction="none").float()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# -- FLOPs ---------------------------------------------------------------------------------------


def matmul_parameters(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, int]:
    """Weights that multiply every token: the blocks' projections (full multi-head attention,
    gated MLP) plus the LM head of a policy; a score model's head is negligible."""
    blocks = layers * (4 * hidden * hidden + 3 * hidden * intermediate)
    return {"policy": blocks + hidden * vocab, "score": blocks}


def ppo_iteration_flops(
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    batch: int,
    prompt_tokens: float,
    response_tokens: float,
    epochs: int,
) -> dict[str, float]:
    """Model FLOPs of one PPO iteration on unpadded tokens (2 per multiply-add; backward = 2x
    forward; causal attention 2·h·S² per layer and sequence forward).

    generation: prefill + one decoding step per response token (the KV cache holds the past);
    scoring: reference, reward and critic forward (old log-probs come from decoding);
    update: ``epochs`` x forward+backward of actor and critic over every sequence."""
    n = matmul_parameters(hidden, intermediate, layers, vocab)
    sequence = prompt_tokens + response_tokens
    attention = 2 * hidden * sequence**2 * layers  # one causal forward of one sequence
    generation = batch * (2 * n["policy"] * sequence + attention)
    scoring = batch * (2 * (n["policy"] + 2 * n["score"]) * sequence + 3 * attention)
    update = epochs * batch * (6 * (n["policy"] + n["score"]) * sequence + 6 * attention)
    return {"generation": generation, "scoring": scoring, "update": update}


def decode_bandwidth_fraction(
    tokens_per_s: float, batch: int, weight_bytes: float, bandwidth_bytes_per_s: float
) -> float:
    """Generated tokens/s over the memory-bandwidth limit: a decoding step reads every weight
    once for the whole batch, so at most ``bandwidth / weight_bytes`` steps of ``batch`` tokens
    run per second (KV-cache reads, which the limit leaves out, only lower it)."""
    return tokens_per_s / (batch * bandwidth_bytes_per_s / weight_bytes)


def copy_bandwidth_bytes_per_s(device: str, size_bytes: int = 2**30, repeats: int = 10) -> float:
    """Measured memory bandwidth: bytes read and written per second by a large tensor copy."""
    source = torch.empty(size_bytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * size_bytes * repeats / (time.perf_counter() - start)


def bf16_matmul_peak_tflops(size: int = 8192, repeats: int = 10) -> float:
    """Measured dense bf16 matmul throughput on this GPU (the FLOP limit)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


# -- saferlhf ------------------------------------------------------------------------------------


def run_saferlhf(args, paths: dict[str, Path], run_dir: Path, variant: str) -> dict:
    """N + W iterations of the real ``saferlhf task=ppo preference=single``."""
    from pytorch_lightning.callbacks import Callback

    import saferlhf.rl.rollout as rollout_module
    import saferlhf.tasks.ppo as ppo
    from saferlhf.cli import run

    print(f"saferlhf [{variant}]: {args.warmup} + {args.iterations} PPO iterations ...", flush=True)

    class StepWall(Callback):
        """Wall time of each whole training step (one PPO iteration)."""

        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(args.device)
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(args.device)
            self.times.append(time.perf_counter() - self.started)

    # Record the generated width (saferlhf stops when every row has ended), the padded prompt
    # width, the real prompt tokens and the share of real (not padding) tokens of each
    # rollout; the wrapper only reads shapes and masks.
    shapes: list[tuple[int, int, float, float]] = []
    original = ppo.sample_responses
    chunked_log_probs = rollout_module.chunked_token_log_probs

    def recording(actor, tokenizer, prompt_ids, **kwargs):
        rollout = original(actor, tokenizer, prompt_ids, **kwargs)
        prompt_tokens = sum(len(ids) for ids in prompt_ids) / len(prompt_ids)
        real_share = float(rollout.attention_mask.float().mean())
        shapes.append((rollout.prompt_width, rollout.responses.shape[1], prompt_tokens, real_share))
        return rollout

    wall = StepWall()
    cfg = compose_cfg(*saferlhf_overrides(args, paths, variant))
    reset_peak_memory(args.device)
    ppo.sample_responses = recording
    if variant == "fused_logprob_liger":
        rollout_module.chunked_token_log_probs = liger_token_log_probs
    try:
        run(cfg, run_dir, callbacks=[wall])
    finally:
        ppo.sample_responses = original
        rollout_module.chunked_token_log_probs = chunked_log_probs
    # Only rollouts are recorded: the untimed before/after evaluations sample through
    # saferlhf.evaluate.policy, not through the task module.

    history = json.loads((run_dir / "ppo_history.json").read_text())
    keep = slice(args.warmup, None)
    parts = {
        name: [h[f"time/{name}"] for h in history][keep]
        for name in ("generation", "scoring", "update")
    }
    totals = [sum(p) for p in zip(*parts.values(), strict=True)]
    kept_shapes = shapes[keep]
    result = {
        "overrides": SAFERLHF_VARIANTS[variant],
        "iteration_s": totals,
        "median_iteration_s": median(totals),
        "median_split_s": {name: median(values) for name, values in parts.items()},
        "step_wall_s": wall.times[keep],
        "median_step_wall_s": median(wall.times[keep]),
        "samples_per_s": args.batch / median(wall.times[keep]),
        "generation_tokens_per_s": args.batch
        * median([s[1] for s in kept_shapes])
        / median(parts["generation"]),
        "mean_response_length": [h["rollout/response_length"] for h in history][keep],
        "mean_prompt_tokens": median([s[2] for s in kept_shapes]),
        "prompt_width": [s[0] for s in kept_shapes],
        "generated_width": [s[1] for s in kept_shapes],
        # what packing keeps of each rollout's (B, P + R) cells (the update's minibatches are
        # trimmed first, so they hold no more padding than this)
        "real_token_share": [s[3] for s in kept_shapes],
        "stopped_early_at_eos": any(s[1] < args.new_tokens for s in kept_shapes),
        "peak_memory_gib": peak_memory_gib(args.device),
    }
    del cfg
    reset_peak_memory(args.device)
    return result


# -- TRL -----------------------------------------------------------------------------------------


def run_trl(
    args, paths: dict[str, Path], batches: list[list[list[int]]], out_dir: Path, algo: dict
) -> dict:
    """The same work through TRL 1.12's PPOTrainer, each step timed by a callback.

    Runs in a child process of its own (see :func:`run_trl_half`), with saferlhf's PPO
    settings passed in as ``algo``.
    """
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

    if args.device == "cpu":
        torch.set_num_threads(1)
    steps = args.iterations + args.warmup
    cuda = args.device == "cuda"

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_begin(self, a, state, control, **kwargs):
            synchronize(args.device)
            self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kwargs):
            synchronize(args.device)
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
        use_cpu=not cuda,
        bf16=cuda,  # the 0.5b preset's weights are bf16; the tiny CPU runs are float32
        seed=SEED,
        per_device_train_batch_size=args.batch,  # one rollout of B; the update's micro-batch is
        gradient_accumulation_steps=1,  # capped at the minibatch, so one optimizer step each
        num_mini_batches=args.batch // args.minibatch,
        local_rollout_forward_batch_size=args.batch,  # generate and score the batch at once
        num_ppo_epochs=args.epochs,
        total_episodes=steps * args.batch,
        response_length=args.new_tokens,
        stop_token=None,  # fixed-length generation of T tokens
        temperature=algo["temperature"],
        num_sample_generations=0,
        learning_rate=algo["actor_lr"],
        kl_coef=algo["kl_coef"],
        cliprange=algo["clip_range"],
        cliprange_value=algo["value_clip_range"],
        gamma=algo["gamma"],
        lam=algo["gae_lambda"],
        logging_steps=1,
        disable_tqdm=True,
    )
    timer = StepTimer()
    reset_peak_memory(args.device)
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
    result = {
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "policy_dtype": str(policy.dtype),
        # PPOConfig defaults gradient_checkpointing=True, but PPOTrainer.train never enables it
        "policy_gradient_checkpointing": bool(policy.is_gradient_checkpointing),
        "iteration_s": times,
        "median_iteration_s": median(times),
        "samples_per_s": args.batch / median(times),
        "steps_run": len(timer.times),
        "prompt_width": [max(len(ids) for ids in batch) for batch in batches][args.warmup :],
        "peak_memory_gib": peak_memory_gib(args.device),
    }
    del trainer, policy
    reset_peak_memory(args.device)
    return result


# -- main ----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "pytorch-lightning", "trl", "accelerate", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def trl_missing(args) -> str | None:
    if args.skip_trl:
        return "--skip-trl"
    try:
        import trl.experimental.ppo  # noqa: F401
    except ImportError as error:
        return f"TRL's PPOTrainer is not importable: {error}"
    return None


def preset_arch(preset: str) -> dict:
    """The architecture of ``preset``; for tiny, ``conf/model/tiny.yaml``'s with its tokenizer's
    vocabulary size."""
    if preset in ARCHS:
        return ARCHS[preset]
    model = compose_cfg("model=tiny").model
    return dict(model.arch) | {"vocab_size": model.tokenizer.vocab_size}


def add_bandwidth(result: dict, args) -> None:
    """Each run's decoding as a fraction of the memory-bandwidth limit."""
    if "bandwidth_gb_per_s" not in result:
        return
    arch = preset_arch(args.preset)
    parameters = matmul_parameters(
        arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"],
        arch["vocab_size"],
    )["policy"]  # fmt: skip
    weight_bytes = parameters * (4 if args.preset == "tiny" else 2)  # float32 or bf16
    result["decode_weight_bytes"] = weight_bytes
    for run in result["saferlhf"].values():
        if "generation_tokens_per_s" in run:
            run["decode_bandwidth_fraction"] = decode_bandwidth_fraction(
                run["generation_tokens_per_s"], args.batch, weight_bytes,
                result["bandwidth_gb_per_s"] * 1e9,
            )  # fmt: skip


def add_flops(result: dict, args) -> None:
    """Model FLOPs of each run's iteration and their fraction of the measured peak."""
    if args.preset not in ARCHS or "peak_bf16_tflops" not in result:
        return
    arch = ARCHS[args.preset]
    base = result["saferlhf"]["default"]
    flops = ppo_iteration_flops(
        arch["hidden_size"],
        arch["intermediate_size"],
        arch["num_hidden_layers"],
        arch["vocab_size"],
        args.batch,
        base["mean_prompt_tokens"],
        median(base["generated_width"]),
        args.epochs,
    )
    total = sum(flops.values())
    peak = result["peak_bf16_tflops"] * 1e12
    result["iteration_tflop"] = {k: v / 1e12 for k, v in flops.items()} | {"total": total / 1e12}
    for run in [*result["saferlhf"].values(), result.get("trl", {})]:
        if "median_iteration_s" in run:
            run["flop_limit_fraction"] = total / (run["median_iteration_s"] * peak)
    if "median_split_s" in base:
        base["flop_limit_fraction_by_part"] = {
            part: flops[part] / (base["median_split_s"][part] * peak) for part in flops
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--preset", choices=tuple(PRESETS), default=None, help="default: tiny on cpu, 0.5b on cuda"
    )
    parser.add_argument("--iterations", type=int, default=5, help="timed PPO iterations (N)")
    parser.add_argument("--warmup", type=int, default=2, help="dropped first iterations (W)")
    parser.add_argument("--batch", type=int, help="rollout batch size (B; preset's default)")
    parser.add_argument("--new-tokens", type=int, help="response length (T; preset's default)")
    parser.add_argument("--epochs", type=int, help="PPO epochs (E; preset's default)")
    parser.add_argument("--minibatch", type=int, help="PPO minibatch size (M; preset's default)")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated saferlhf runs of {sorted(SAFERLHF_VARIANTS)}, 'default' first "
        f"(default: {DEFAULT_VARIANTS})",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=240.0,
        help="start no further saferlhf variant after this many seconds (the GPU run fits 6 min)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="back-to-back runs of saferlhf's default and TRL (default: 3 on cpu, 1 on cuda)",
    )
    parser.add_argument("--skip-trl", action="store_true", help="measure saferlhf only")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    args.preset = args.preset or ("0.5b" if args.device == "cuda" else "tiny")
    if args.preset != "tiny" and args.device == "cpu":
        parser.error(f"--preset {args.preset} is for --device cuda (bf16 weights)")
    args.pairs = args.pairs or (1 if args.device == "cuda" else 3)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch % args.minibatch:
        parser.error("--batch must be a multiple of --minibatch")
    variants = (args.variants or DEFAULT_VARIANTS[args.device]).split(",")
    if variants[0] != "default" or not set(variants) <= set(SAFERLHF_VARIANTS):
        parser.error(
            f"--variants must start with 'default' and name only {sorted(SAFERLHF_VARIANTS)}"
        )
    args.output = args.output or RESULTS / f"bench_ppo_{args.device}.json"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.device == "cpu":
        torch.set_num_threads(1)

    started = time.perf_counter()
    result: dict = {
        "config": {
            "preset": args.preset,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "ppo_epochs": args.epochs,
            "minibatch": args.minibatch,
            "pairs": args.pairs,
            "model": "conf/model/tiny.yaml (untrained), float32"
            if args.preset == "tiny"
            else f"untrained Llama {ARCHS[args.preset]}, bf16 weights",
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "versions": versions(),
        "saferlhf": {},
    }

    def save() -> None:
        add_flops(result, args)
        add_bandwidth(result, args)
        result["wall_s"] = time.perf_counter() - started
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")

    result["bandwidth_gb_per_s"] = copy_bandwidth_bytes_per_s(args.device) / 1e9
    print(f"measured copy bandwidth: {result['bandwidth_gb_per_s']:.0f} GB/s", flush=True)
    if args.device == "cuda":
        result["peak_bf16_tflops"] = bf16_matmul_peak_tflops()
        print(f"measured bf16 matmul peak: {result['peak_bf16_tflops']:.0f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        root = Path(tmp)
        paths = build_artifacts(root / "artifacts", args.preset, args.device)
        missing = trl_missing(args)
        # saferlhf's default and TRL back to back (--pairs times), then the optional variants
        # while time remains. The shared CPU cores drift by about 10% between minutes, so each
        # ratio compares two runs made one after the other and the headline is their median.
        result["pairs"] = []
        pair_count = args.pairs if missing is None else 1
        for pair in range(pair_count):
            print(f"pair {pair + 1} of {pair_count}", flush=True)
            ours = run_saferlhf(args, paths, root / f"saferlhf_default_{pair}", "default")
            result["saferlhf"].setdefault("default", ours)
            trl = run_trl_half(args, paths, root / f"trl_run_{pair}", missing)
            result.setdefault("trl", trl)
            if "median_iteration_s" in trl:
                split = ours["median_split_s"]
                result["pairs"].append(
                    {
                        "saferlhf_s": ours["median_iteration_s"],
                        "saferlhf_split_s": split,
                        "trl_s": trl["median_iteration_s"],
                        "ratio": trl["median_iteration_s"] / ours["median_iteration_s"],
                        "ratio_step_wall": trl["median_iteration_s"] / ours["median_step_wall_s"],
                        # The ratio if saferlhf's generation cost nothing: scoring and update
                        # are the same model passes in both frameworks.
                        "ratio_without_generation": trl["median_iteration_s"]
                        / (split["scoring"] + split["update"]),
                    }
                )
                result["ratio_trl_over_saferlhf"] = median([p["ratio"] for p in result["pairs"]])
                result["ratio_trl_over_saferlhf_step_wall"] = median(
                    [p["ratio_step_wall"] for p in result["pairs"]]
                )
            save()
        for variant in variants[1:]:
            if time.perf_counter() - started > args.budget_s:
                result["saferlhf"][variant] = {"skipped": f"over --budget-s {args.budget_s}"}
                continue
            unavailable = liger_unavailable(args.device) if "liger" in variant else None
            if unavailable is not None:
                print(f"saferlhf [{variant}]: skipped: {unavailable}", flush=True)
                result["saferlhf"][variant] = {"skipped": unavailable}
                continue
            try:
                result["saferlhf"][variant] = run_saferlhf(
                    args, paths, root / f"saferlhf_{variant}", variant
                )
            except Exception as error:  # a failed optional variant must not lose the others
                result["saferlhf"][variant] = {"failed": f"{type(error).__name__}: {error}"}
            save()
    report(result)
    print(f"wrote {args.output}")


def run_trl_half(args, paths, run_dir: Path, missing: str | None) -> dict:
    if missing is not None:
        return {"missing": missing}
    from saferlhf.models import load_tokenizer

    cfg = compose_cfg(*saferlhf_overrides(args, paths))
    batches = prompt_batches(
        cfg, load_tokenizer(str(paths["policy"])), args.iterations + args.warmup, args.batch
    )
    algo = cfg.algo
    settings = {
        "temperature": cfg.eval.sampling.temperature,
        **{
            k: algo[k]
            for k in (
                "actor_lr",
                "kl_coef",
                "clip_range",
                "value_clip_range",
                "gamma",
                "gae_lambda",
            )
        },
    }
    print(f"TRL: {args.warmup} + {args.iterations} PPO steps ...", flush=True)
    # A fresh process: TRL calls gc.collect() twice per step, and each call walks every live
    # Python object, so TRL in this process would also pay for saferlhf's (Lightning, Hydra).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_trl, args, paths, batches, run_dir, settings).result()


def report(result: dict) -> None:
    c, t = result["config"], result.get("trl", {})
    print(
        f"\n{c['device']}, preset {c['preset']}: B={c['batch']} T={c['new_tokens']}"
        f" E={c['ppo_epochs']} M={c['minibatch']}, median over {c['iterations']} iterations"
        f" after {c['warmup']} warm-up, {c['torch_threads']} torch thread(s)"
    )
    first_pair = " (pair 1)" if len(result["pairs"]) > 1 else ""
    for variant, s in result["saferlhf"].items():
        if "median_iteration_s" not in s:
            print(f"saferlhf [{variant}]  {s}")
            continue
        variant += first_pair if variant == "default" else ""
        split = s["median_split_s"]
        memory = f", peak {s['peak_memory_gib']:.1f} GiB" if s["peak_memory_gib"] else ""
        flop = (
            f", {s['flop_limit_fraction']:.1%} of the FLOP limit"
            if "flop_limit_fraction" in s
            else ""
        )
        if "decode_bandwidth_fraction" in s:
            flop += f", decoding at {s['decode_bandwidth_fraction']:.1%} of the bandwidth limit"
        print(
            f"saferlhf [{variant}]  {s['median_iteration_s']:.3f} s/iteration"
            f" (generation {split['generation']:.3f} + scoring {split['scoring']:.3f}"
            f" + update {split['update']:.3f}); whole step {s['median_step_wall_s']:.3f} s,"
            f" {s['samples_per_s']:.1f} samples/s, {s['generation_tokens_per_s']:.0f} generated"
            f" tokens/s{memory}{flop}"
        )
    s = result["saferlhf"]["default"]
    print(
        f"          generated widths {s['generated_width']} of T={c['new_tokens']}"
        f" (stopped early at EOS: {s['stopped_early_at_eos']}),"
        f" mean response length {[round(x, 1) for x in s['mean_response_length']]},"
        f" real (unpadded) token share {[round(x, 3) for x in s['real_token_share']]}"
    )
    if "missing" in t:
        print(f"TRL       MISSING: {t['missing']}", file=sys.stderr)
        return
    memory = f", peak {t['peak_memory_gib']:.1f} GiB" if t["peak_memory_gib"] else ""
    flop = (
        f", {t['flop_limit_fraction']:.1%} of the FLOP limit" if "flop_limit_fraction" in t else ""
    )
    print(
        f"TRL{first_pair}  {t['median_iteration_s']:.3f} s/step, {t['samples_per_s']:.1f} samples/s"
        f"  ({t['steps_run']} steps run; {t['policy_dtype']}, mixed precision"
        f" {t['mixed_precision']}, gradient checkpointing {t['policy_gradient_checkpointing']}"
        f"{memory}{flop})"
    )
    pairs = [f"{p['trl_s']:.3f}/{p['saferlhf_s']:.3f} = {p['ratio']:.2f}x" for p in result["pairs"]]
    bounds = [f"{p['ratio_without_generation']:.2f}x" for p in result["pairs"]]
    print(
        f"ratio TRL/saferlhf  {result['ratio_trl_over_saferlhf']:.2f}x"
        f"  (against saferlhf's whole training step: "
        f"{result['ratio_trl_over_saferlhf_step_wall']:.2f}x); median of {len(pairs)}"
        f" back-to-back pair(s): {', '.join(pairs)}"
    )
    print(f"ratio if saferlhf's generation took no time: {', '.join(bounds)}")


if __name__ == "__main__":
    main()
