"""The networks of a PPO run, loaded from the SFT, reward and cost artifacts."""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from saferlhf.models import load_tokenizer


@dataclass
class PPOModels:
    """The actor and its reference, the frozen score models and the critics they initialise."""

    tokenizer: PreTrainedTokenizerBase
    actor: PreTrainedModel
    reference: PreTrainedModel | None  # None: a LoRA actor, whose base is the reference
    reward_model: PreTrainedModel
    reward_critic: PreTrainedModel
    cost_model: PreTrainedModel | None  # None without a cost model (preference=single)
    cost_critic: PreTrainedModel | None


def load_ppo_models(policy_dir: str, reward_dir: str, cost_dir: str | None, algo) -> PPOModels:
    """Every network from its artifact; ``algo`` says whether the actor is LoRA
    (``lora_rank``, ``lora_alpha``) and whether activations are recomputed."""
    tokenizer = load_tokenizer(policy_dir)
    actor = AutoModelForCausalLM.from_pretrained(policy_dir)
    reference = None
    if algo.lora_rank > 0:
        actor = with_lora(actor, algo.lora_rank, algo.lora_alpha)
    else:
        reference = AutoModelForCausalLM.from_pretrained(policy_dir)
    reward_model = load_score_model(reward_dir, "reward", tokenizer)
    reward_critic = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    cost_model = cost_critic = None
    if cost_dir is not None:
        cost_model = load_score_model(cost_dir, "cost", tokenizer)
        cost_critic = AutoModelForSequenceClassification.from_pretrained(cost_dir)
    if algo.gradient_checkpointing:
        for model in (actor, reward_critic, cost_critic):
            if model is not None:
                model.activation_checkpointing_enable()
    return PPOModels(
        tokenizer, actor, reference, reward_model, reward_critic, cost_model, cost_critic
    )


def with_lora(model: PreTrainedModel, rank: int, alpha: float) -> PreTrainedModel:
    """``model`` with trainable LoRA adapters on every linear layer of its blocks (the LM head
    stays frozen), the base weights frozen."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules="all-linear", task_type=TaskType.CAUSAL_LM
    )
    return get_peft_model(model, config)


def load_score_model(path: str, name: str, tokenizer) -> PreTrainedModel:
    """The score model of ``init.<name>``, which must share the policy's tokenizer: PPO scores
    the rollout's token ids as they are."""
    model = AutoModelForSequenceClassification.from_pretrained(path)
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"init.{name}={path!r} uses a different tokenizer from init.policy; train it with init.policy set"
        )
    return model
