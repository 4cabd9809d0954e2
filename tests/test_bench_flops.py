"""The FLOP accounting behind experiments/bench_ppo.py's FLOP-limit fraction, and when its
liger variant can run."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

BENCH = Path(__file__).parents[1] / "experiments" / "bench_ppo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ppo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ppo_iteration_flops_by_hand(bench):
    # h=2, i=3, 1 layer, V=5: blocks 4*4 + 3*6 = 34, policy 34 + 10 = 44; S = 1 + 1, attention
    # 2*h*S^2 = 16. generation 2*44*2 + 16; scoring 2*(44 + 2*34)*2 + 3*16; update 6*78*2 + 6*16.
    flops = bench.ppo_iteration_flops(
        2, 3, 1, 5, batch=1, prompt_tokens=1, response_tokens=1, epochs=1
    )
    assert flops == {"generation": 192, "scoring": 496, "update": 1032}


def test_matmul_parameters_and_attention_match_a_counted_forward(bench):
    torch.manual_seed(0)
    hidden, intermediate, layers, vocab, tokens = 64, 96, 2, 300, 10
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"  # plain matmuls, which torch's counter sees
    model = LlamaForCausalLM(config).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.randint(0, vocab, (1, tokens)), use_cache=False)
    params = bench.matmul_parameters(hidden, intermediate, layers, vocab)
    causal_attention = 2 * hidden * tokens**2 * layers
    # Eager attention multiplies the full S x S scores, masked after: twice the causal FLOPs.
    assert counter.get_total_flops() == 2 * params["policy"] * tokens + 2 * causal_attention


def test_decode_bandwidth_fraction_by_hand(bench):
    # 1 GB of weights at 100 GB/s: at most 100 steps/s, 6,400 tokens/s at batch 64.
    assert bench.decode_bandwidth_fraction(3200.0, 64, 1e9, 100e9) == pytest.approx(0.5)


def test_the_presets_have_the_parameter_counts_their_names_say(bench):
    for name, billions in (("0.5b", 0.47), ("1.5b", 1.57)):
        arch = bench.ARCHS[name]
        blocks = bench.matmul_parameters(
            arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], 0
        )["policy"]
        total = blocks + 2 * arch["vocab_size"] * arch["hidden_size"]  # embedding and LM head
        assert total / 1e9 == pytest.approx(billions, abs=0.005)


@pytest.mark.parametrize(
    "installed, reason",
    [(None, "not installed"), ("0.8.1", "needs 0.8.2 or later"), ("0.8.5", None)],
)
def test_the_liger_variant_runs_on_cuda_with_a_liger_whose_per_token_gradients_are_right(
    bench, monkeypatch, installed, reason
):
    import importlib.metadata

    def version(name):
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert "CUDA only" in bench.liger_unavailable("cpu")
    unavailable = bench.liger_unavailable("cuda")
    assert unavailable is None if reason is None else reason in unavailable
