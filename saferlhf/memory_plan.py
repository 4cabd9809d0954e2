"""Per-rank GPU memory of a PPO-Lagrangian run, estimated from the architecture alone.

PPO-Lagrangian holds six model instances: the actor (trainable), its reference (frozen), the
reward and cost models (frozen) and the reward and cost critics (trainable). Critics and score
models are the transformer with a scalar ``score`` head (``hidden × 1``, no bias) instead of the
LM head, as ``AutoModelForSequenceClassification`` builds them.

Precision, as a ZeRO-style mixed-precision run keeps it:

- weights in bf16 (2 bytes a parameter), frozen or trainable;
- gradients in bf16 (2 bytes a trainable parameter);
- AdamW: an fp32 master copy and fp32 first and second moments (12 bytes a trainable
  parameter). Trainable parameters thus cost 16 bytes, as under Lightning's ``bf16-mixed``
  (fp32 weights and gradients, 4 + 4 + 8), only split differently;
- activations, KV cache in bf16; logits of the log-probs in fp32 (the code casts them).

Strategies: ``ddp`` replicates everything on every rank; ``fsdp`` (ZeRO-3) shards weights,
gradients and optimizer state over the ranks and gathers one unit (a decoder layer, or the
embedding or LM head when larger, each assumed wrapped on its own) while it computes.
Offloading a frozen model to CPU streams it in the same units, so its GPU bytes are that unit.

Phases run one after another and so does every model within a phase (``tasks/ppo.py``):
generation (actor), scoring over the whole rollout (reference, reward and cost models,
critics, without autograd) and the update (actor, then each critic, on a training
micro-batch). Each instance's transient bytes (gathered unit, activations, KV cache, logits)
are those of its own busiest phase; the total is every instance's resident bytes (weights,
gradients, optimizer state) plus the largest one instance's transient bytes.

Activations (bf16, per token and decoder layer, attention by SDPA so no ``S × S`` matrix):
saved for backward, each RMSNorm keeps its fp32 input and bf16 output (3 hidden-size bf16
equivalents), attention keeps q, k, v and its output, the SwiGLU MLP keeps gate, up, silu(gate)
and their product. Without autograd only one layer's MLP working set is alive (its input, its
normed input, gate, up and silu(gate)). Gradient checkpointing keeps each layer's input plus
one layer's full set while it is recomputed. Not counted: the CUDA context, allocator
fragmentation, the bf16 logits before their fp32 cast and the logits' gradient, the ptx batch
of ``ptx_mode=joint``, LoRA's rank-sized intermediates, and FSDP's prefetch of a second unit.

LoRA (rank r on q, k, v, o, gate, up and down, as ``target_modules="all-linear"``) makes only
the actor's adapters trainable; the critics stay full fine-tunes, as ``saferlhf/rl/models.py``
builds them. Its reference is the actor's base with the adapters off, so the reference holds
no weights of its own, though its scoring pass still costs activations and logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

GIB = 2**30
BF16_BYTES = 2
FP32_BYTES = 4
ADAMW_BYTES = 3 * FP32_BYTES  # fp32 master weights, first and second moments
STRATEGIES = ("ddp", "fsdp")
RESIDENT_KINDS = ("weights", "gradients", "optimizer")
TRANSIENT_KINDS = ("gathered_unit", "activations", "kv_cache", "logits")
KINDS = RESIDENT_KINDS + TRANSIENT_KINDS
INSTANCES = ("actor", "reference", "reward_model", "cost_model", "reward_critic", "cost_critic")


@dataclass(frozen=True)
class Architecture:
    """A Llama/Qwen2-shaped decoder: GQA attention, SwiGLU MLP, RMSNorms."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2 has biases on the q, k and v projections

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


# Numbers from each model's config.json on the Hugging Face hub.
PRESETS = {
    "0.5b": Architecture("Qwen2.5-0.5B-Instruct", 896, 24, 4864, 14, 2, 151936, True, True),
    "7b": Architecture("Llama-2-7B", 4096, 32, 11008, 32, 32, 32000, False),
    "8b": Architecture("Llama-3-8B", 4096, 32, 14336, 32, 8, 128256, False),
    "70b": Architecture("Llama-3-70B", 8192, 80, 28672, 64, 8, 128256, False),
}


def preset(name: str) -> Architecture:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


# -- parameter counts ------------------------------------------------------------------------


def layer_parameters(arch: Architecture) -> int:
    """One decoder layer: q, k, v, o projections, gate, up, down, and two RMSNorm weights."""
    h, q, kv, inter = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    attention = h * q + 2 * h * kv + q * h
    if arch.qkv_bias:
        attention += q + 2 * kv
    return attention + 3 * h * inter + 2 * h


def embedding_parameters(arch: Architecture) -> int:
    return arch.vocab_size * arch.hidden_size


def backbone_parameters(arch: Architecture) -> int:
    """Embedding, decoder layers and the final RMSNorm: what every instance shares."""
    return embedding_parameters(arch) + arch.num_layers * layer_parameters(arch) + arch.hidden_size


def lm_head_parameters(arch: Architecture) -> int:
    return 0 if arch.tie_word_embeddings else embedding_parameters(arch)


def causal_lm_parameters(arch: Architecture) -> int:
    """The actor and the reference."""
    return backbone_parameters(arch) + lm_head_parameters(arch)


def score_model_parameters(arch: Architecture) -> int:
    """Score models and critics: the backbone and a ``hidden × 1`` score head."""
    return backbone_parameters(arch) + arch.hidden_size


def lora_parameters(arch: Architecture, rank: int) -> int:
    """Adapters A (``in × r``) and B (``r × out``) on each of a layer's seven projections."""
    h, q, kv, inter = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    in_plus_out = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + inter)
    return arch.num_layers * rank * in_plus_out


def largest_unit_parameters(arch: Architecture, has_lm_head: bool) -> int:
    """The largest block FSDP or an offloaded model gathers at once."""
    head = lm_head_parameters(arch) if has_lm_head else arch.hidden_size
    return max(layer_parameters(arch), embedding_parameters(arch), head)


# -- activation bytes ------------------------------------------------------------------------


def training_layer_bytes_per_token(arch: Architecture) -> int:
    """Bytes one decoder layer saves for backward, per token (see the module docstring)."""
    h, q, kv, inter = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    norms = 2 * 3 * h  # each: fp32 input (2 bf16 equivalents) and bf16 output
    attention = q + 2 * kv + q  # q, k, v and the attention output
    mlp = 4 * inter  # gate, up, silu(gate), their product
    return BF16_BYTES * (norms + attention + mlp)


def inference_layer_bytes_per_token(arch: Architecture) -> int:
    """Without autograd: a layer's input and normed input, gate, up and silu(gate) at once."""
    return BF16_BYTES * (2 * arch.hidden_size + 3 * arch.intermediate_size)


def training_activation_bytes(arch: Architecture, tokens: int, checkpointing: bool) -> int:
    per_layer = training_layer_bytes_per_token(arch)
    if checkpointing:  # each layer's input, plus the layer being recomputed
        return tokens * (arch.num_layers * BF16_BYTES * arch.hidden_size + per_layer)
    return tokens * arch.num_layers * per_layer


def kv_cache_bytes(arch: Architecture, batch: int, length: int) -> int:
    return 2 * arch.num_layers * arch.kv_dim * batch * length * BF16_BYTES


def logits_bytes(arch: Architecture, batch: int, positions: int) -> int:
    return batch * positions * arch.vocab_size * FP32_BYTES


# -- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """How the run is spread and what it saves memory with."""

    world_size: int
    strategy: str  # "ddp" or "fsdp"
    lora_rank: int = 0  # 0: full fine-tune of the actor
    offload_frozen: bool = False  # reference, reward and cost models live on CPU
    gradient_checkpointing: bool = False  # on the actor and critics


@dataclass(frozen=True)
class Workload:
    """Per-rank sizes. The log-probs' LM head runs on response positions only
    (``rl.rollout.response_logits``), so logits span ``generation_length``."""

    rollout_batch: int  # prompts sampled and scored per rank per iteration
    prompt_length: int  # padded prompt width
    generation_length: int  # max_new_tokens
    micro_batch: int  # rows per training step (algo.minibatch_size)

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.generation_length


@dataclass(frozen=True)
class InstanceMemory:
    """One model's bytes on one rank: resident ones and those of its busiest phase."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    gathered_unit: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0
    logits: float = 0.0
    peak_phase: str = ""

    @property
    def resident(self) -> float:
        return sum(getattr(self, kind) for kind in RESIDENT_KINDS)

    @property
    def transient(self) -> float:
        return sum(getattr(self, kind) for kind in TRANSIENT_KINDS)


@dataclass(frozen=True)
class MemoryPlan:
    architecture: Architecture
    setup: Setup
    workload: Workload
    instances: dict[str, InstanceMemory] = field(default_factory=dict)

    @property
    def busiest(self) -> str:
        """The instance whose transient bytes set the peak."""
        return max(self.instances, key=lambda name: self.instances[name].transient)

    def kind_bytes(self) -> dict[str, float]:
        """The total by kind: resident kinds of every instance, transient ones of the busiest."""
        busiest = self.instances[self.busiest]
        totals = {kind: sum(getattr(m, kind) for m in self.instances.values()) for kind in KINDS}
        totals |= {kind: getattr(busiest, kind) for kind in TRANSIENT_KINDS}
        return totals

    @property
    def total_bytes(self) -> float:
        return sum(self.kind_bytes().values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def to_dict(self) -> dict:
        """Everything in GiB, for JSON."""
        return {
            "architecture": asdict(self.architecture),
            "setup": asdict(self.setup),
            "workload": asdict(self.workload),
            "instances_gib": {
                name: {kind: getattr(m, kind) / GIB for kind in KINDS} | {"phase": m.peak_phase}
                for name, m in self.instances.items()
            },
            "kinds_gib": {kind: value / GIB for kind, value in self.kind_bytes().items()},
            "busiest": self.busiest,
            "total_gib": self.total_gib,
        }


def validate(setup: Setup, workload: Workload) -> None:
    if setup.world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {setup.world_size}")
    if setup.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {setup.strategy!r}")
    if setup.lora_rank < 0:
        raise ValueError(f"lora_rank must be 0 (off) or positive, got {setup.lora_rank}")
    for name, value in asdict(workload).items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _peak(phases: dict[str, dict[str, float]]) -> dict:
    """The phase with the most transient bytes, as InstanceMemory keywords."""
    name = max(phases, key=lambda phase: sum(phases[phase].values()))
    return phases[name] | {"peak_phase": name}


def plan_memory(arch: Architecture, setup: Setup, workload: Workload) -> MemoryPlan:
    """Per-rank bytes of every PPO-Lagrangian instance under ``setup`` and ``workload``."""
    validate(setup, workload)
    fsdp = setup.strategy == "fsdp"
    shard = setup.world_size if fsdp else 1
    lora = setup.lora_rank > 0
    w = workload
    rollout_tokens = w.rollout_batch * w.sequence_length
    micro_tokens = w.micro_batch * w.sequence_length

    def unit(has_lm_head: bool, streamed: bool) -> float:
        """Bytes gathered while a model computes: none when it sits whole on the GPU."""
        if not (fsdp or streamed):
            return 0.0
        return largest_unit_parameters(arch, has_lm_head) * BF16_BYTES

    def scoring(has_lm_head: bool, streamed: bool) -> dict[str, float]:
        """A forward pass without autograd over the whole rollout."""
        logits = logits_bytes(arch, w.rollout_batch, w.generation_length) if has_lm_head else 0
        return {
            "gathered_unit": unit(has_lm_head, streamed),
            "activations": rollout_tokens * inference_layer_bytes_per_token(arch),
            "logits": logits,
        }

    def training(has_lm_head: bool) -> dict[str, float]:
        logits = logits_bytes(arch, w.micro_batch, w.generation_length) if has_lm_head else 0
        activations = training_activation_bytes(arch, micro_tokens, setup.gradient_checkpointing)
        return {
            "gathered_unit": unit(has_lm_head, False),
            "activations": activations,
            "logits": logits,
        }

    def trainable(params: int, trained: int) -> dict[str, float]:
        return {
            "weights": params * BF16_BYTES / shard,
            "gradients": trained * BF16_BYTES / shard,
            "optimizer": trained * ADAMW_BYTES / shard,
        }

    def frozen(params: int) -> dict[str, float]:
        return {"weights": 0.0 if setup.offload_frozen else params * BF16_BYTES / shard}

    actor_params = causal_lm_parameters(arch)
    adapters = lora_parameters(arch, setup.lora_rank)
    generation = {
        "gathered_unit": unit(True, False),
        "activations": w.rollout_batch * w.prompt_length * inference_layer_bytes_per_token(arch),
        "kv_cache": kv_cache_bytes(arch, w.rollout_batch, w.sequence_length),
        "logits": logits_bytes(arch, w.rollout_batch, 1),  # one step's next-token logits
    }
    instances = {
        "actor": InstanceMemory(
            **trainable(actor_params + adapters, adapters if lora else actor_params),
            **_peak({"generation": generation, "training": training(True)}),
        ),
        # A LoRA reference is the actor's base: no weights of its own, streamed never.
        "reference": InstanceMemory(
            **({} if lora else frozen(actor_params)),
            **_peak({"scoring": scoring(True, setup.offload_frozen and not lora)}),
        ),
    }
    score_params = score_model_parameters(arch)
    for name in ("reward_model", "cost_model"):
        instances[name] = InstanceMemory(
            **frozen(score_params), **_peak({"scoring": scoring(False, setup.offload_frozen)})
        )
    for name in ("reward_critic", "cost_critic"):
        instances[name] = InstanceMemory(
            **trainable(score_params, score_params),
            **_peak({"scoring": scoring(False, False), "training": training(False)}),
        )
    return MemoryPlan(arch, setup, workload, instances)
