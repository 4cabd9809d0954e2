"""FSDP2 (``trainer=fsdp``, ``trainer=fsdp_cpu``): how models are sharded, gathered for
decoding and exported, and that a sharded run computes what the DDP run on the same ranks
computes, resumes exactly and writes folders plain transformers loads."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from saferlhf.config import PPO_STRATEGIES
from saferlhf.models import build_causal_lm, build_score_model
from saferlhf.models.sharding import (
    decoding_weights,
    inference_context,
    shard_modules,
    unsharded_copy,
)
from saferlhf.rl.config import decodes_compiled
from saferlhf.rl.rollout import response_log_probs, sample_responses, token_values
from tests.tiny import benchmark_tokenizer, micro_model_cfg, ppo_history, save_micro_artifacts


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A one-process gloo group: FSDP2's code paths run as they do on many ranks."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tokenizer():
    return benchmark_tokenizer(num_train=200, vocab_size=512)


def test_every_model_is_sharded_per_decoder_layer_and_exports_its_exact_weights(
    one_rank_mesh, tokenizer
):
    torch.manual_seed(0)
    actor = build_causal_lm(micro_model_cfg(), tokenizer)
    critic = build_score_model(micro_model_cfg(), tokenizer)
    reference = build_causal_lm(micro_model_cfg(), tokenizer).requires_grad_(False)
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    shard_modules([actor, critic], [reference], mesh=one_rank_mesh, offload_frozen=True)
    shard_modules([actor], mesh=one_rank_mesh)  # configure_model runs again: nothing changes

    for model in (actor, critic, reference):
        assert isinstance(model, FSDPModule)
        assert all(isinstance(layer, FSDPModule) for layer in model.model.layers)
        assert all(isinstance(p, DTensor) for p in model.parameters())
    # token_values runs a critic's backbone and head outside its forward: each gathers its own.
    assert isinstance(critic.model, FSDPModule) and isinstance(critic.score, FSDPModule)

    copy = unsharded_copy(actor, is_global_zero=True)
    assert type(copy).__name__ == "LlamaForCausalLM" and not isinstance(copy, FSDPModule)
    assert copy.state_dict().keys() == before.keys()
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in before.items())
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # still tied
    assert unsharded_copy(actor, is_global_zero=False) is None


@pytest.mark.parametrize("gather_weights", [True, False], ids=["gathered_once", "layer_by_layer"])
def test_a_sharded_actor_decodes_and_scores_as_the_plain_one(
    one_rank_mesh, tokenizer, gather_weights
):
    torch.manual_seed(0)
    plain = build_causal_lm(micro_model_cfg(), tokenizer).eval()
    critic = build_score_model(micro_model_cfg(), tokenizer).eval()
    sharded = build_causal_lm(micro_model_cfg(), tokenizer).eval()
    sharded.load_state_dict(plain.state_dict())
    plain_critic = build_score_model(micro_model_cfg(), tokenizer).eval()
    plain_critic.load_state_dict(critic.state_dict())
    shard_modules([sharded, critic], mesh=one_rank_mesh)
    prompts = [tokenizer.encode("How do I bake bread?"), tokenizer.encode("Tell me a story")]
    sampling = dict(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0)

    rollouts = []
    for model in (plain, sharded):
        torch.manual_seed(1)
        rollouts.append(
            sample_responses(model, tokenizer, prompts, **sampling, gather_weights=gather_weights)
        )
    assert torch.equal(rollouts[0].input_ids, rollouts[1].input_ids)
    torch.testing.assert_close(rollouts[0].logprobs, rollouts[1].logprobs)
    # Released after decoding: the actor holds its shards again.
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    with inference_context(critic):
        values = token_values(critic, rollouts[1])
        packed_values = token_values(critic, rollouts[1], packed=True)
    with inference_context(plain_critic):
        torch.testing.assert_close(values, token_values(plain_critic, rollouts[0]))
    # algo.packed_rollouts runs sharded too (chunked log-probs are refused under FSDP).
    mask = rollouts[1].response_mask
    torch.testing.assert_close(packed_values, values * mask, atol=1e-5, rtol=1e-4)
    with inference_context(sharded):
        packed_logprobs = response_log_probs(sharded, rollouts[1], packed=True)
    torch.testing.assert_close(packed_logprobs, rollouts[0].logprobs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gather_all", [True, False])
def test_decoding_weights_gather_all_layers_or_one_at_a_time_and_free_them_after(
    one_rank_mesh, tokenizer, gather_all
):
    actor = build_causal_lm(micro_model_cfg(), tokenizer)
    shard_modules([actor], mesh=one_rank_mesh)
    ids = torch.tensor([tokenizer.encode("hello there")])
    with torch.no_grad(), decoding_weights(actor, gather_all):
        actor(input_ids=ids)
        # Gathered parameters are plain tensors, resharded ones DTensors again.
        gathered = [not isinstance(p, DTensor) for p in actor.model.layers[0].parameters()]
        assert all(gathered) if gather_all else not any(gathered)
    assert all(isinstance(p, DTensor) for p in actor.parameters())
    # Training's forward then backward: the layers reshard after forward as fully_shard set.
    actor(input_ids=ids, labels=ids).loss.backward()
    assert all(isinstance(p, DTensor) for p in actor.parameters())


def test_a_frozen_model_is_resharded_after_each_forward(one_rank_mesh, tokenizer):
    reference = build_causal_lm(micro_model_cfg(), tokenizer).requires_grad_(False)
    shard_modules([], [reference], mesh=one_rank_mesh)
    with torch.no_grad():
        reference(input_ids=torch.tensor([tokenizer.encode("hello there")]))
    # Its embeddings and LM head too: no backward would ever reshard them.
    assert all(isinstance(p, DTensor) for p in reference.parameters())


# -- config ------------------------------------------------------------------------------------


def test_ppo_runs_under_fsdp_but_not_with_lora_compiled_decoding_or_chunked_log_probs(compose_cfg):
    from saferlhf.config import validate_config
    from saferlhf.errors import ConfigError

    assert "fsdp" in PPO_STRATEGIES
    cfg = compose_cfg("task=ppo", "trainer=fsdp")
    validate_config(cfg)
    validate_config(compose_cfg("task=ppo", "trainer=fsdp", "algo.packed_rollouts=true"))
    assert not decodes_compiled(cfg.algo, cfg.trainer)  # gathered weights change every iteration
    with pytest.raises(ConfigError, match="algo.lora_rank=8: LoRA does not run under"):
        validate_config(compose_cfg("task=ppo", "trainer=fsdp", "algo.lora_rank=8"))
    with pytest.raises(ConfigError, match="algo.compile_generation=true"):
        validate_config(compose_cfg("task=ppo", "trainer=fsdp", "algo.compile_generation=true"))
    with pytest.raises(ConfigError, match="algo.logprob_chunk=1024: chunked log-probs call"):
        validate_config(compose_cfg("task=ppo", "trainer=fsdp", "algo.logprob_chunk=1024"))
    with pytest.raises(ConfigError, match="strategy takes one optimizer .* use trainer=fsdp"):
        validate_config(compose_cfg("task=ppo", "trainer=deepspeed"))


# -- two processes over gloo (the CLI, as a user runs it) ---------------------------------------

SMALL = (
    "logger=csv", "trainer.enable_progress_bar=false", "data.benchmark.num_train=300",
    "data.benchmark.num_test=60",
)  # fmt: skip


def _saferlhf(run_dir, *overrides) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "saferlhf.cli", *SMALL, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=run_dir.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _weights(folder):
    return load_file(folder / "model.safetensors")


def _assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def _ppo_args(artifacts):
    return (
        "task=ppo", f"init.policy={artifacts / 'policy'}", f"init.reward={artifacts / 'reward'}",
        f"init.cost={artifacts / 'cost'}", "algo.iterations=3", "algo.rollout_batch_size=8",
        "algo.minibatch_size=4", "eval.sampling.max_new_tokens=8", "eval.num_prompts=16",
        "task.checkpoint_every=2",
    )  # fmt: skip


# Sharding changes where sums happen (reduce-scatter then shards, instead of an all-reduce of
# whole gradients), so float32 results agree to rounding: about 1e-7 relative per step,
# compounded over a few AdamW steps. A real difference (a rank's data, a skipped gradient
# sync, λ apart) moves losses and weights by 1e-3 or more.
RTOL, ATOL = 1e-5, 1e-5


@pytest.mark.slow
def test_ppo_lagrangian_under_fsdp_cpu_matches_ddp_cpu_resumes_exactly_and_exports_a_plain_policy(
    tmp_path,
):
    artifacts = save_micro_artifacts(tmp_path / "artifacts")
    for strategy in ("ddp_cpu", "fsdp_cpu"):
        (tmp_path / strategy).mkdir()
        _saferlhf(tmp_path / strategy, *_ppo_args(artifacts), f"trainer={strategy}")
    ddp, fsdp = (ppo_history(tmp_path / s) for s in ("ddp_cpu", "fsdp_cpu"))
    assert len(fsdp) == 3
    assert fsdp == [pytest.approx(h, rel=RTOL, abs=ATOL) for h in ddp]
    for history in (ddp, fsdp):
        assert [h["lagrange/lambda_rank_spread"] for h in history] == [0.0, 0.0, 0.0]
    assert len({h["lagrange/lambda"] for h in fsdp}) > 1  # λ moved, identically on both ranks
    policy = tmp_path / "fsdp_cpu" / "artifacts" / "policy"
    _assert_same_weights(_weights(policy), _weights(tmp_path / "ddp_cpu/artifacts/policy"), ATOL)
    model = AutoModelForCausalLM.from_pretrained(policy)
    assert type(model).__name__ == "LlamaForCausalLM"

    # Stopped by SIGTERM (to rank 0, which passes it on) once its checkpoint of iteration 2, a
    # folder of per-rank shards, is written; then resumed: the same history and weights as the
    # uninterrupted run, bit for bit.
    cut = tmp_path / "cut"
    cut.mkdir()
    args = (*SMALL, *_ppo_args(artifacts), "trainer=fsdp_cpu", f"hydra.run.dir={cut}")
    process = subprocess.Popen(
        [sys.executable, "-m", "saferlhf.cli", *args],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    while not (cut / "checkpoints" / "last.ckpt").exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=300)
    finally:  # a hang must fail the test, not leave ranks behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143 and "resumes from" in stderr, stderr[-3000:]
    assert not (cut / "summary.json").exists()
    _saferlhf(cut, *_ppo_args(artifacts), "trainer=fsdp_cpu", "ckpt_path=last")
    assert ppo_history(cut) == fsdp
    _assert_same_weights(_weights(cut / "artifacts/policy"), _weights(policy), 0.0)


@pytest.mark.slow
def test_sft_and_reward_under_fsdp_cpu_match_ddp_cpu(tmp_path):
    stages = {
        "sft": ("task=sft", "task.max_epochs=1"),
        "reward": ("task=reward", "task.max_epochs=1"),
    }
    for strategy in ("ddp_cpu", "fsdp_cpu"):
        for stage, overrides in stages.items():
            (tmp_path / strategy / stage).mkdir(parents=True)
            _saferlhf(tmp_path / strategy / stage, *overrides, f"trainer={strategy}")
    for stage, artifact in (("sft", "policy"), ("reward", "reward")):
        ddp, fsdp = (
            json.loads((tmp_path / s / stage / "summary.json").read_text())["metrics"]
            for s in ("ddp_cpu", "fsdp_cpu")
        )
        assert fsdp == pytest.approx(ddp, rel=RTOL, abs=ATOL)
        folders = [tmp_path / s / stage / "artifacts" / artifact for s in ("ddp_cpu", "fsdp_cpu")]
        _assert_same_weights(_weights(folders[0]), _weights(folders[1]), ATOL)
    AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "fsdp_cpu/reward/artifacts/reward"
    )
