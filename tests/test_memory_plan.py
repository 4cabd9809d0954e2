"""The memory plan of experiments/memory_plan.py: parameter counts, bytes by hand, savers."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from saferlhf.memory_plan import (
    GIB,
    INSTANCES,
    PRESETS,
    RESIDENT_KINDS,
    TRANSIENT_KINDS,
    Architecture,
    Setup,
    Workload,
    causal_lm_parameters,
    lora_parameters,
    plan_memory,
    preset,
    score_model_parameters,
)

SCRIPT = Path(__file__).parents[1] / "experiments" / "memory_plan.py"
CARD_GIB = 79.6  # an 80 GB card as nvidia-smi reports it
# h=4, 1 layer, MLP 8, 2 heads of dim 2, 1 KV head (kv_dim 2), vocabulary 10, untied head
TINY = Architecture("tiny", 4, 1, 8, 2, 1, 10, False)
TINY_WORKLOAD = Workload(rollout_batch=1, prompt_length=3, generation_length=2, micro_batch=1)
BIG_WORKLOAD = Workload(rollout_batch=64, prompt_length=464, generation_length=48, micro_batch=32)


@pytest.mark.parametrize(
    "name, published", [("0.5b", 494e6), ("7b", 6.74e9), ("8b", 8.03e9), ("70b", 70.6e9)]
)
def test_preset_parameter_counts_match_the_published_ones(name, published):
    assert causal_lm_parameters(preset(name)) == pytest.approx(published, rel=0.005)


def _hf_config(arch: Architecture):
    from transformers import LlamaConfig, Qwen2Config

    config_class = Qwen2Config if arch.qkv_bias else LlamaConfig
    return config_class(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        intermediate_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings,
        num_labels=1,
        pad_token_id=0,
    )


@pytest.mark.parametrize(
    "arch",
    [TINY, replace(TINY, tie_word_embeddings=True), PRESETS["0.5b"], PRESETS["8b"]],
    ids=["llama-untied", "llama-tied", "qwen2.5-0.5b", "llama-3-8b"],
)
def test_parameter_counts_equal_transformers_models(arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _hf_config(arch)
    with torch.device("meta"):  # shapes only, no memory
        lm = AutoModelForCausalLM.from_config(config)
        scorer = AutoModelForSequenceClassification.from_config(config)
    assert causal_lm_parameters(arch) == sum(p.numel() for p in lm.parameters())
    assert score_model_parameters(arch) == sum(p.numel() for p in scorer.parameters())


def test_lora_parameters_equal_peft_all_linear():
    import torch
    from transformers import AutoModelForCausalLM

    from saferlhf.rl.models import with_lora

    torch.manual_seed(0)
    model = with_lora(AutoModelForCausalLM.from_config(_hf_config(TINY)), rank=3, alpha=16.0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameters(TINY, 3) == trainable


def test_tiny_architecture_bytes_by_hand():
    # layer: q 4*4 + k 4*2 + v 4*2 + o 4*4 = 48, MLP 3*4*8 = 96, norms 2*4 = 8 -> 152.
    # causal LM: embedding 40 + 152 + final norm 4 + head 40 = 236; score model: 40+152+4+4 = 200.
    plan = plan_memory(TINY, Setup(world_size=1, strategy="ddp"), TINY_WORKLOAD)
    bf16, adamw = 2, 12
    resident = {
        "actor": (236 * bf16, 236 * bf16, 236 * adamw),
        "reference": (236 * bf16, 0, 0),
        "reward_model": (200 * bf16, 0, 0),
        "cost_model": (200 * bf16, 0, 0),
        "reward_critic": (200 * bf16, 200 * bf16, 200 * adamw),
        "cost_critic": (200 * bf16, 200 * bf16, 200 * adamw),
    }
    for name, expected in resident.items():
        memory = plan.instances[name]
        assert (memory.weights, memory.gradients, memory.optimizer) == expected, name
    # training, 1 row of 5 tokens: per token the layer saves norms 2*3*4 + q, k, v, output
    # 4+2+2+4 + MLP 4*8 = 68 bf16 values, 5 * 68 * 2 = 680 bytes; the actor's fp32 logits
    # over 2 response positions: 2 * 10 * 4 = 80
    actor, critic = plan.instances["actor"], plan.instances["reward_critic"]
    assert (actor.activations, actor.logits, actor.peak_phase) == (680, 80, "training")
    assert (critic.activations, critic.logits, critic.peak_phase) == (680, 0, "training")


def test_tiny_architecture_rollout_bytes_by_hand():
    plan = plan_memory(TINY, Setup(1, "ddp"), replace(TINY_WORKLOAD, rollout_batch=4))
    actor = plan.instances["actor"]
    # K and V of 1 layer, kv_dim 2, 4 rows of 3 + 2 tokens, bf16: 160 bytes; the prefill's
    # working set 4 rows * 3 tokens * (2*4 + 3*8) bf16 = 768; one step's fp32 logits 4 * 10 * 4
    assert (actor.kv_cache, actor.activations, actor.logits) == (160, 768, 160)
    assert actor.peak_phase == "generation"
    # the reference's log-probs: fp32 logits over 4 rows * 2 response positions * 10 tokens;
    # its forward's working set over 4 rows of 5 tokens
    reference = plan.instances["reference"]
    assert (reference.logits, reference.activations) == (320, 4 * 5 * 32 * 2)


def test_the_total_is_every_resident_byte_and_the_busiest_instances_transient_bytes():
    plan = plan_memory(PRESETS["7b"], Setup(8, "fsdp", gradient_checkpointing=True), BIG_WORKLOAD)
    resident = sum(m.resident for m in plan.instances.values())
    transient = max(m.transient for m in plan.instances.values())
    assert plan.total_bytes == pytest.approx(resident + transient)
    assert set(plan.instances) == set(INSTANCES)
    assert plan.to_dict()["total_gib"] == pytest.approx(plan.total_bytes / GIB)


@pytest.mark.parametrize("lora_rank", [0, 8])
def test_fsdp_divides_resident_bytes_by_the_world_size(lora_rank):
    arch = PRESETS["8b"]
    one = plan_memory(arch, Setup(1, "fsdp", lora_rank), BIG_WORKLOAD)
    eight = plan_memory(arch, Setup(8, "fsdp", lora_rank), BIG_WORKLOAD)
    for name in INSTANCES:
        for kind in RESIDENT_KINDS:
            sharded = getattr(eight.instances[name], kind)
            assert sharded == pytest.approx(getattr(one.instances[name], kind) / 8), (name, kind)
        for kind in TRANSIENT_KINDS:
            assert getattr(eight.instances[name], kind) == getattr(one.instances[name], kind)
    ddp = plan_memory(arch, Setup(8, "ddp", lora_rank), BIG_WORKLOAD)
    assert ddp.instances["actor"].weights == one.instances["actor"].weights  # replicated


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_each_saver_reduces_memory(strategy):
    arch = PRESETS["7b"]
    base = Setup(8, strategy)
    plain = plan_memory(arch, base, BIG_WORKLOAD)

    offloaded = plan_memory(arch, replace(base, offload_frozen=True), BIG_WORKLOAD)
    assert offloaded.total_bytes < plain.total_bytes
    for name in ("reference", "reward_model", "cost_model"):
        assert offloaded.instances[name].weights == 0
        assert offloaded.instances[name].gathered_unit > 0  # streamed in one unit at a time

    checkpointed = plan_memory(arch, replace(base, gradient_checkpointing=True), BIG_WORKLOAD)
    assert checkpointed.total_bytes < plain.total_bytes
    critic, critic_checkpointed = (
        p.instances["reward_critic"].activations for p in (plain, checkpointed)
    )
    assert critic_checkpointed < critic / 10

    lora = plan_memory(arch, replace(base, lora_rank=16), BIG_WORKLOAD)
    assert lora.total_bytes < plain.total_bytes
    assert lora.instances["actor"].optimizer < plain.instances["actor"].optimizer / 100
    assert lora.instances["reference"].resident == 0  # the actor's base is the reference


def test_a_7b_full_fine_tune_needs_fsdp_and_checkpointing_on_80gb_cards():
    arch = PRESETS["7b"]
    ddp = plan_memory(arch, Setup(8, "ddp"), BIG_WORKLOAD)
    fsdp = plan_memory(arch, Setup(8, "fsdp"), BIG_WORKLOAD)
    fsdp_checkpointed = plan_memory(
        arch, Setup(8, "fsdp", gradient_checkpointing=True), BIG_WORKLOAD
    )
    # DDP alone: 6.74B trainable parameters at 16 bytes already exceed the card
    assert ddp.instances["actor"].resident / GIB > CARD_GIB
    assert ddp.total_gib > CARD_GIB
    assert fsdp.total_gib > CARD_GIB  # the critics' stored activations
    assert fsdp_checkpointed.total_gib < CARD_GIB


@pytest.mark.parametrize(
    "change, argument",
    [
        ({"world_size": 0}, "world_size"),
        ({"strategy": "zero2"}, "strategy"),
        ({"lora_rank": -1}, "lora_rank"),
    ],
)
def test_an_invalid_setup_names_its_argument(change, argument):
    setup = replace(Setup(8, "fsdp"), **change)
    with pytest.raises(ValueError, match=argument):
        plan_memory(TINY, setup, TINY_WORKLOAD)


def test_an_invalid_workload_or_preset_names_its_argument():
    with pytest.raises(ValueError, match="micro_batch"):
        plan_memory(TINY, Setup(1, "ddp"), replace(TINY_WORKLOAD, micro_batch=0))
    with pytest.raises(ValueError, match="preset"):
        preset("13b")


def test_the_cli_table_prints_every_preset_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--table", "--json", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in ("Qwen2.5-0.5B-Instruct", "Llama-2-7B", "Llama-3-8B", "Llama-3-70B"):
        assert name in result.stdout
    table = json.loads(out.read_text())
    assert len(table["rows"]) == len(result.stdout.splitlines()) - 4  # header, rule, blank, wrote
    ddp = table["rows"][0]["plans"]["7b"]
    assert ddp["setup"]["strategy"] == "ddp" and not ddp["fits"]
