"""Structured configs: the schema behind every group of the Hydra tree in ``conf/``.

Each dataclass is stored in Hydra's ConfigStore as ``<group>/schema`` and every YAML of the
group starts from it (``defaults: [schema]``), so an override with a misspelt key or a wrong
type fails at composition. Values live in the YAML files; a default here is only given where
every YAML of the group shares it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saferlhf.errors import ConfigError


@dataclass
class BenchmarkConfig:
    num_train: int = MISSING
    num_test: int = MISSING
    seed: int = MISSING
    label_noise: float = MISSING
    benign_fraction: float = MISSING
    # The one-dimensional annotator's harm penalty per severity tier 0-3 (see conf/data/benchmark)
    single_harm_penalty: list[float] = MISSING


@dataclass
class DataConfig:
    source: str = MISSING  # benchmark | hub | local
    kind: str = MISSING  # row schema: preference | single | qa
    name: str | None = None  # hub dataset id (source=hub)
    subset: str | None = None  # hub config name, e.g. default, alpaca-7b
    revision: str | None = None
    path: str | None = None  # a file or a directory of train/test files (source=local)
    # Our split name -> the source's split name; datasets slicing works, e.g. train[:1000].
    split: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    test_fraction: float = 0.1  # share carved out as test when a local path has no test file
    on_bad_row: str = "raise"  # raise | skip (skipped rows are written to the run dir)
    benchmark: BenchmarkConfig | None = None


@dataclass
class TaxonomyConfig:
    """The harm categories rows are labelled with and moderation models predict (see
    conf/taxonomy/ and saferlhf.taxonomy)."""

    name: str = MISSING
    categories: list[str] | None = None  # in the order a moderation model predicts them
    severity: bool | None = None  # rows carry severity_level 0..3
    path: str | None = None  # taxonomy=file: a YAML file with categories and severity


@dataclass
class PreferenceConfig:
    name: str = MISSING  # single | dual
    benchmark_kind: str = MISSING  # which labels the embedded benchmark emits for this setting
    use_cost: bool = MISSING  # dual preference trains a cost model and constrains the policy
    ppo_kl_coef: float = MISSING  # algo.kl_coef of conf/algo/ppo.yaml under this setting


@dataclass
class TokenizerConfig:
    vocab_size: int = MISSING
    min_frequency: int = MISSING


@dataclass
class LearningRates:
    """The learning rates that suit a model scale (rates that train a from-scratch tiny model
    would wreck a pretrained one): the task and algo configs read theirs from here."""

    sft: float = MISSING
    score: float = MISSING  # reward and cost models
    moderation: float = MISSING
    dpo: float = MISSING
    actor: float = MISSING  # PPO's actor and critics
    critic: float = MISSING


class PromptTemplate(StrEnum):
    safe_rlhf = "safe_rlhf"  # BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:
    chat = "chat"  # the tokenizer's own chat template, stopping at its end-of-turn token


@dataclass
class ModelConfig:
    name: str = MISSING
    name_or_path: str | None = MISSING  # hub id or local folder; None builds `arch` from scratch
    arch: dict[str, Any] | None = MISSING  # transformers config kwargs for a from-scratch model
    tokenizer: TokenizerConfig | None = MISSING  # trained on the data when building from scratch
    max_length: int = MISSING
    trust_remote_code: bool = MISSING
    dtype: str = MISSING
    lr: LearningRates = field(default_factory=LearningRates)
    prompt_template: PromptTemplate = PromptTemplate.safe_rlhf
    # SFT, ptx and score-model batches packed into rows of max_length tokens, unpadded; needs
    # attention that reads sequence boundaries from position_ids, as transformers' own models'
    pack_sequences: bool = True


@dataclass
class TrainerConfig:
    accelerator: str = MISSING
    devices: Any = MISSING
    strategy: str = "auto"  # auto | ddp | fsdp (FSDP2, every model sharded per layer) | deepspeed_*
    offload_frozen: bool = False  # fsdp: keep the frozen models' shards in CPU memory
    precision: str = "32-true"
    num_nodes: int = 1
    deterministic: bool = False
    enable_progress_bar: bool = True
    log_every_n_steps: int = 10


@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | csv | tensorboard | none
    offline: bool = True
    project: str = "saferlhf"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TaskConfig:
    name: str = MISSING


@dataclass
class DataReportTaskConfig(TaskConfig):
    plot: bool = MISSING


@dataclass
class SupervisedTaskConfig(TaskConfig):
    """A stage trained by gradient descent on a fixed dataset, validated every epoch."""

    batch_size: int = MISSING
    max_epochs: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_ratio: float = MISSING
    grad_clip: float = MISSING
    accumulate_grad_batches: int = MISSING
    monitor: str = MISSING  # validation metric that picks the best checkpoint
    monitor_mode: str = "max"  # max | min
    # The monitor's best possible value (1.0 for an accuracy): the fit stops once a validation
    # reaches it, since no later epoch could be picked; None trains every epoch.
    monitor_bound: float | None = None
    checkpoint_every_n_steps: int = MISSING  # how often last.ckpt is refreshed mid-epoch


@dataclass
class ScoreTaskConfig(SupervisedTaskConfig):
    """Reward (Bradley-Terry) and cost (Safe RLHF) model training."""

    reg: float = MISSING  # L2 weight on the scores
    corrupted_pairs: float = MISSING  # reward: extra (response, corrupted copy) pairs, per pair


@dataclass
class EvaluateScoreTaskConfig(TaskConfig):
    split: str = MISSING
    batch_size: int = MISSING


@dataclass
class ModerationTaskConfig(SupervisedTaskConfig):
    """Moderation: one logit per category of the taxonomy, and a 4-way severity head when the
    taxonomy has severity levels."""

    class_balance: str = MISSING  # none | balanced: reweight rare categories and severities
    val_fraction: float = MISSING  # share of train held out to choose thresholds


@dataclass
class SamplingConfig:
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int = MISSING  # 0 keeps every token
    top_p: float = MISSING


@dataclass
class EvalConfig:
    """How policies are judged: seeded responses to a fixed prompt set. task=ppo and task=dpo
    (initial and final policy), task=evaluate and task=generate read it; PPO's rollouts sample
    with the same settings."""

    num_prompts: int = MISSING  # a seeded subset of the test split's distinct prompts
    # Responses sampled per prompt by task=evaluate and PPO's and DPO's initial/final gold
    # metrics (task=generate answers once); one response is a noisy estimate of a policy.
    responses_per_prompt: int = MISSING
    seed: int = MISSING  # picks the prompts and seeds the sampling
    batch_size: int = MISSING  # prompts per generate call and per scoring batch
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


class LossAggregation(StrEnum):
    """How a PPO loss averages its per-token terms (saferlhf.losses.masked_aggregate)."""

    token_mean = "token_mean"  # over every response token of the minibatch
    sequence_mean = "sequence_mean"  # over each response's tokens, then over the responses


class PtxMode(StrEnum):
    """How the ptx (SFT) loss reaches the actor."""

    joint = "joint"  # added to the PPO loss: one actor step on both
    separate = "separate"  # a second actor step on the SFT loss alone, after the PPO step


class PtxData(StrEnum):
    """Which responses of the training rows the ptx (SFT) loss learns from."""

    all = "all"  # every distinct response: the SFT policy's own data
    # the more helpful response of each row, where it is safe (views.preferred_conversations)
    preferred = "preferred"


class CostLimitOrigin(StrEnum):
    """What ``lagrange.cost_limit`` is measured from."""

    zero = "zero"  # d is cost_limit itself, in the cost model's units (Safe RLHF)
    # d is cost_limit plus the cost model's mean cost of the train split's safe responses, so a
    # limit means the same whatever scale a training draw gave the cost model
    safe_responses = "safe_responses"


class LRSchedule(StrEnum):
    constant = "constant"  # the learning rate throughout, no warm-up
    cosine = "cosine"  # linear warm-up over warmup_ratio of the steps, then cosine decay to 0


@dataclass
class PPOConfig:
    """PPO / PPO-Lagrangian hyperparameters (Safe RLHF, arXiv 2310.12773, section 3.3)."""

    iterations: int = MISSING  # rollout + update rounds
    rollout_batch_size: int = MISSING  # prompts per iteration on each rank
    ppo_epochs: int = MISSING
    minibatch_size: int = MISSING
    kl_coef: float = MISSING  # β: per-token KL penalty in both reward and cost
    gamma: float = MISSING
    gae_lambda: float = MISSING
    clip_range: float = MISSING
    value_clip_range: float = MISSING
    loss_aggregation: LossAggregation = MISSING  # of the actor and critic losses
    score_clip: float | None = MISSING  # clamp reward and cost scores to ±this; None: off
    missing_eos_penalty: float | None = MISSING  # taken off the reward of unended responses
    actor_lr: float = MISSING
    critic_lr: float = MISSING
    actor_lr_schedule: LRSchedule = MISSING
    critic_lr_schedule: LRSchedule = MISSING
    warmup_ratio: float = MISSING  # share of each network's optimizer steps (cosine only)
    adam_betas: list[float] = MISSING  # AdamW's (β1, β2)
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    ptx_coef: float = MISSING  # weight of the SFT loss on the actor; 0 turns it off
    ptx_mode: PtxMode = MISSING
    ptx_data: PtxData = MISSING
    ptx_batch_size: int = MISSING
    length_bucketing: bool = MISSING  # minibatches of rows of similar length (less padding)
    compile_generation: bool | None = MISSING  # torch.compile'd fixed-shape decoding; None: CUDA
    gather_actor_for_decoding: bool = MISSING  # fsdp: the actor's layers gathered once per rollout
    gradient_checkpointing: bool = MISSING  # actor and critics recompute activations in backward
    packed_rollouts: bool = MISSING  # scoring and update passes on the rollout rows packed unpadded
    logprob_chunk: int = MISSING  # > 0: the update's actor log-probs this many tokens at a time
    lora_rank: int = MISSING  # > 0: train LoRA adapters on the actor; reference = adapters off
    lora_alpha: float = MISSING


@dataclass
class LagrangeConfig:
    """The Lagrange multiplier λ of PPO-Lagrangian: the keys every rule has. Each rule is a class
    in saferlhf.rl.lagrange whose ``Config`` extends this one, stored by ``register_rule`` as
    ``lagrange/<name>_schema``; ``lagrange`` below takes the node of any of them."""

    name: str = MISSING  # the rule; its schema admits its own name only
    # d: the episode-cost threshold. Every rule has it so that experiments that set it compose
    # with any rule; a fixed λ ignores it.
    cost_limit: float = MISSING
    cost_limit_from: CostLimitOrigin = CostLimitOrigin.zero


@dataclass
class PPOTaskConfig(TaskConfig):
    sample_every: int = MISSING  # iterations between wandb tables of sample generations
    checkpoint_every: int = MISSING  # iterations between refreshes of last.ckpt


@dataclass
class DPOTaskConfig(SupervisedTaskConfig):
    """Direct preference optimisation (Rafailov et al. 2023) on better (single) or on the
    dual-preference pairs chosen by ``dual_rule``."""

    beta: float = MISSING
    dual_rule: str = MISSING  # how preference=dual turns (better, safer) into one pair order


@dataclass
class JudgeConfig:
    """An optional LLM judge behind an OpenAI-compatible chat-completions endpoint."""

    enabled: bool = MISSING
    base_url: str | None = MISSING
    model: str | None = MISSING
    api_key_env: str = MISSING  # the environment variable that holds the key
    allow_insecure_http: bool = MISSING  # plain http to another host than this machine
    timeout: float = MISSING
    max_prompts: int = MISSING


@dataclass
class EvaluateTaskConfig(TaskConfig):
    """Generate with fixed sampling from each policy and compare them."""

    policies: dict[str, str] = MISSING  # name -> policy folder
    baseline: str | None = MISSING  # the policy the others are compared against (win rates, arena)
    prompts_file: str | None = MISSING  # JSONL with a "prompt" field; None: the test prompts
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class StageConfig:
    """One stage of a pipeline: a task run with its overrides and earlier stages' artifacts."""

    name: str = MISSING
    overrides: list[str] = field(default_factory=list)
    init: dict[str, str] = field(default_factory=dict)  # init key -> stage whose artifact it takes
    policies: dict[str, str] = field(default_factory=dict)  # evaluate: policy name -> stage


@dataclass
class PipelineTaskConfig(TaskConfig):
    stages: list[StageConfig] = MISSING
    workers: int = MISSING  # stages run at a time, each in its own process; 1: in order, here


@dataclass
class GuardConfig:
    """Risk control for task=generate: resample what the moderator flags, then refuse."""

    moderation: str | None = None  # moderation model folder; None generates unguarded
    max_severity: int = 0  # the highest severity let through (0..3)
    retries: int = 2  # resamples of a flagged response before it is replaced by the refusal
    refusal: str = "i cannot help with that ."


@dataclass
class GenerateTaskConfig(TaskConfig):
    prompts_file: str | None = MISSING  # JSONL with a "prompt" field; None: the test prompts


@dataclass
class ServeTaskConfig(TaskConfig):
    """task=serve reads policy_path, guard.*, serve.*, model.max_length and eval.sampling."""


@dataclass
class ServeConfig:
    """task=serve: the OpenAI-compatible server's address, limits and batching."""

    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    token_env: str | None = None  # environment variable holding the bearer token; unset: no auth
    max_body_bytes: int = 65536  # larger request bodies are refused (413)
    max_tokens: int = 64  # the most max_tokens a request may ask for (< model.max_length)
    max_prompt_tokens: int = 1024  # the longest prompt (last user message) accepted, in tokens
    max_n: int = 8  # the most choices a request may ask for
    max_batch_size: int = 8  # requests batched into one generation; 1 turns batching off
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for others


@dataclass
class ObjectiveConfig:
    """What a run returns to a Hydra sweeper (saferlhf.objective): ``metric`` of its summary,
    maximised while ``constraint`` stays at or under ``at_most``; no metric: nothing."""

    metric: str | None = None  # e.g. final/gold/helpfulness
    constraint: str | None = None  # e.g. final/gold/unsafe_or_unreadable_rate
    at_most: float | None = None


@dataclass
class InitConfig:
    """Artifacts of earlier stages (Hugging Face folders) that a stage starts from."""

    policy: str | None = None
    reward: str | None = None
    cost: str | None = None
    moderation: str | None = None


@dataclass
class Config:
    task: TaskConfig = MISSING
    data: DataConfig = MISSING
    taxonomy: TaxonomyConfig = MISSING
    model: ModelConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    preference: PreferenceConfig = MISSING
    init: InitConfig = field(default_factory=InitConfig)
    algo: PPOConfig = MISSING
    lagrange: Any = MISSING  # typed by the chosen λ rule's own schema, a LagrangeConfig
    eval: EvalConfig = MISSING
    experiment_name: str = MISSING
    seed: int = MISSING
    num_threads: int | None = None  # torch CPU threads; 1 when several processes share the cores
    ckpt_path: str | None = None  # resume: "last" (this run dir's checkpoints/last.ckpt) or a path
    model_path: str | None = None  # the saved model that task=evaluate_score scores with
    policy_path: str | None = None  # the policy folder that task=generate answers with
    guard: GuardConfig = field(default_factory=GuardConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, node in (
        ("data", DataConfig),
        ("taxonomy", TaxonomyConfig),
        ("preference", PreferenceConfig),
        ("model", ModelConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
        ("eval", EvalConfig),
    ):
        store.store(group=group, name="schema", node=node)
    store.store(group="task", name="data_report_schema", node=DataReportTaskConfig)
    store.store(group="task", name="score_schema", node=ScoreTaskConfig)
    store.store(group="task", name="sft_schema", node=SupervisedTaskConfig)
    store.store(group="task", name="ppo_schema", node=PPOTaskConfig)
    store.store(group="task", name="dpo_schema", node=DPOTaskConfig)
    store.store(group="task", name="evaluate_schema", node=EvaluateTaskConfig)
    store.store(group="task", name="pipeline_schema", node=PipelineTaskConfig)
    store.store(group="task", name="generate_schema", node=GenerateTaskConfig)
    store.store(group="task", name="serve_schema", node=ServeTaskConfig)
    store.store(group="algo", name="schema", node=PPOConfig)
    # Each λ rule stores its own schema when its class is defined; this brings the shipped ones
    # (and torch, which their classes extend).
    import saferlhf.rl.lagrange  # noqa: F401

    store.store(group="task", name="evaluate_score_schema", node=EvaluateScoreTaskConfig)
    store.store(group="task", name="moderation_schema", node=ModerationTaskConfig)


# -- values the schema's types let through ------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """The values a config key may take: from ``low`` to ``high``, each end included unless open."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


POSITIVE = Interval(low=0, low_open=True)
NON_NEGATIVE = Interval(low=0)
AT_LEAST_ONE = Interval(low=1)
SHARE = Interval(0, 1)
SEED = Interval(0, 2**32 - 1)  # what numpy, and so seed_everything, accepts

# Dotted key (fnmatch pattern; list items are numbered) -> its allowed values; the first match
# applies. Every float anywhere must also be finite; null (an option turned off) is not checked.
RANGES: dict[str, Interval] = {
    "*seed": SEED,  # seed, data.benchmark.seed, eval.seed
    "num_threads": AT_LEAST_ONE,
    "data.test_fraction": Interval(0, 1, low_open=True, high_open=True),
    "data.benchmark.num_train": AT_LEAST_ONE,
    "data.benchmark.num_test": AT_LEAST_ONE,
    "data.benchmark.label_noise": SHARE,
    "data.benchmark.benign_fraction": SHARE,
    "model.max_length": AT_LEAST_ONE,
    "model.tokenizer.vocab_size": AT_LEAST_ONE,
    "trainer.num_nodes": AT_LEAST_ONE,
    "trainer.log_every_n_steps": AT_LEAST_ONE,
    "*batch_size": AT_LEAST_ONE,  # task.batch_size, eval.batch_size, algo.rollout_batch_size, ...
    "task.max_epochs": AT_LEAST_ONE,
    "task.workers": AT_LEAST_ONE,
    "task.accumulate_grad_batches": AT_LEAST_ONE,
    "task.checkpoint_every_n_steps": AT_LEAST_ONE,
    "task.checkpoint_every": AT_LEAST_ONE,
    "eval.num_prompts": AT_LEAST_ONE,
    "eval.responses_per_prompt": AT_LEAST_ONE,
    "task.sample_every": NON_NEGATIVE,
    "model.lr.*": POSITIVE,
    "*lr": POSITIVE,  # task.lr, algo.actor_lr, algo.critic_lr, lagrange.lambda_lr
    "*.weight_decay": NON_NEGATIVE,
    "*.warmup_ratio": SHARE,
    "*.grad_clip": NON_NEGATIVE,  # 0 turns clipping off
    "task.reg": NON_NEGATIVE,
    "task.corrupted_pairs": NON_NEGATIVE,
    "task.val_fraction": Interval(0, 1, low_open=True, high_open=True),
    "task.beta": POSITIVE,
    "task.judge.timeout": POSITIVE,
    "eval.sampling.max_new_tokens": AT_LEAST_ONE,
    "eval.sampling.temperature": POSITIVE,
    "eval.sampling.top_k": NON_NEGATIVE,  # 0 keeps every token
    "eval.sampling.top_p": Interval(0, 1, low_open=True),
    "algo.iterations": AT_LEAST_ONE,
    "algo.ppo_epochs": AT_LEAST_ONE,
    "algo.kl_coef": NON_NEGATIVE,
    "algo.gamma": SHARE,
    "algo.gae_lambda": SHARE,
    "algo.clip_range": POSITIVE,
    "algo.value_clip_range": POSITIVE,
    "algo.score_clip": POSITIVE,
    "algo.missing_eos_penalty": NON_NEGATIVE,
    "algo.adam_betas.*": Interval(0, 1, high_open=True),
    "algo.ptx_coef": NON_NEGATIVE,
    "algo.lora_rank": NON_NEGATIVE,
    "algo.logprob_chunk": NON_NEGATIVE,  # 0: all tokens at once
    "algo.lora_alpha": POSITIVE,
    "lagrange.lambda_init": POSITIVE,  # λ = exp(log λ): log 0 does not exist
    "lagrange.lambda_max": POSITIVE,
    "lagrange.lambda_value": NON_NEGATIVE,
    "lagrange.window": AT_LEAST_ONE,
    "lagrange.update_delay": NON_NEGATIVE,
    "guard.max_severity": Interval(0, 3),
    "guard.retries": NON_NEGATIVE,
    "serve.port": Interval(1, 65535),
    "serve.max_body_bytes": AT_LEAST_ONE,
    "serve.max_tokens": AT_LEAST_ONE,
    "serve.max_prompt_tokens": AT_LEAST_ONE,
    "serve.max_n": AT_LEAST_ONE,
    "serve.batch_wait_ms": NON_NEGATIVE,
}


def config_leaves(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every scalar under ``node``; list items are numbered."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        yield key, node
        return
    for name, child in items:
        yield from config_leaves(child, f"{key}.{name}" if key else str(name))


def value_error(key: str, value: Any, ranges: dict[str, Interval] = RANGES) -> str | None:
    """Why ``value`` cannot be the value of ``key``, or None when it can."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return "expected a finite number"
    allowed = next((ranges[pattern] for pattern in ranges if fnmatchcase(key, pattern)), None)
    if allowed is not None and value not in allowed:
        return f"expected a value {allowed}"
    return None


def generation_budgets(cfg: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """``(key, value)`` of the ``max_new_tokens`` the task generates with, if it generates:
    task=ppo, evaluate and generate always, task=dpo for its gold evaluation on the benchmark."""
    name = cfg["task"]["name"]
    if name in ("ppo", "evaluate", "generate") or (
        name == "dpo" and cfg["data"]["source"] == "benchmark"
    ):
        yield "eval.sampling.max_new_tokens", cfg["eval"]["sampling"]["max_new_tokens"]


# What PPO runs under: one process or DDP (Lightning's "auto" picks one of them), or FSDP2.
PPO_STRATEGIES = ("auto", "ddp", "fsdp")


def combination_error(cfg: dict[str, Any]) -> str | None:
    """Why values that are each in range cannot go together, naming both keys, or None."""
    max_length = cfg["model"]["max_length"]
    for key, max_new_tokens in generation_budgets(cfg):
        if max_length <= max_new_tokens:
            return (
                f"model.max_length={max_length}: expected a value > {key}={max_new_tokens}, "
                "so that a prompt has room before the generated tokens"
            )
    model = cfg["model"]
    if model["pack_sequences"] and model["trust_remote_code"]:
        return (
            "model.pack_sequences=true with model.trust_remote_code=true: packed rows stay apart "
            "only in attention that reads sequence boundaries from position_ids, as "
            "transformers' own models do; set model.pack_sequences=false for remote code"
        )
    strategy = cfg["trainer"]["strategy"]
    if cfg["task"]["name"] == "ppo" and strategy not in PPO_STRATEGIES:
        return (
            f"trainer.strategy={strategy}: PPO runs in one process, under DDP or sharded under "
            "FSDP2 (trainer=gpu, trainer=ddp, trainer=fsdp). Lightning's DeepSpeed strategy "
            "takes one optimizer where PPO-Lagrangian has three (actor, two critics) and λ: "
            "use trainer=fsdp for ZeRO-3-style sharding (experiments/memory_plan.py estimates "
            "what fits)"
        )
    if cfg["task"]["name"] == "ppo" and strategy == "fsdp":
        algo = cfg["algo"]
        if algo["lora_rank"] > 0:
            return (
                f"algo.lora_rank={algo['lora_rank']}: LoRA does not run under "
                "trainer.strategy=fsdp yet; set algo.lora_rank=0 or use trainer=ddp"
            )
        if algo["compile_generation"]:
            return (
                "algo.compile_generation=true: compiled decoding does not run under "
                "trainer.strategy=fsdp (its gathered weights change between iterations)"
            )
        if algo["logprob_chunk"] > 0:
            return (
                f"algo.logprob_chunk={algo['logprob_chunk']}: chunked log-probs call the actor's "
                "decoder and LM head apart, which trainer.strategy=fsdp shards as one unit; set "
                "algo.logprob_chunk=0 or use trainer=ddp"
            )
    objective = cfg["objective"]
    if objective["constraint"] is not None and objective["at_most"] is None:
        return (
            f"objective.constraint={objective['constraint']}: expected objective.at_most, its bound"
        )
    if objective["constraint"] is not None and objective["metric"] is None:
        return f"objective.constraint={objective['constraint']}: expected objective.metric to go with it"
    lagrange = cfg["lagrange"]
    lambda_init, lambda_max = lagrange.get("lambda_init"), lagrange.get("lambda_max")
    if lambda_init is not None and lambda_max is not None and lambda_init > lambda_max:
        return (
            f"lagrange.lambda_init={lambda_init}: expected a value <= "
            f"lagrange.lambda_max={lambda_max}"
        )
    return None


def validate_config(cfg: DictConfig) -> None:
    """Refuse, naming the key, a value the schema's types let through but no run can use: a
    missing or unresolvable value, a non-finite number, a size, rate or share out of range,
    values that cannot go together, judge settings that cannot work or would leak."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        # OmegaConf adds lines on the node's types after the message that names the key.
        raise ConfigError(f"{error.full_key}: {str(error.msg).splitlines()[0]}") from None
    for key, value in config_leaves(resolved):
        problem = value_error(key, value)
        if problem:
            raise ConfigError(f"{key}={value}: {problem}")
    problem = combination_error(resolved)
    if problem:
        raise ConfigError(problem)
    judge = resolved["task"].get("judge")
    if judge and judge["enabled"]:
        # Here, before the run dir's config.yaml is written: a refused base_url may hold a
        # password. Imported only when needed: it brings torch.
        from saferlhf.evaluate.judge import check_settings

        check_settings(judge)
