"""Packed training batches: the layout, and the same losses and scores as right-padded rows."""

import pytest
import torch

from saferlhf.data.benchmark import generate_benchmark
from saferlhf.data.collate import pack_sequences, tokenize_conversations, tokenize_sft_examples
from saferlhf.data.moderation import ItemCollator
from saferlhf.data.module import LanguageModelingCollator, PairCollator
from saferlhf.errors import ConfigError
from saferlhf.models import build_causal_lm, build_score_model
from saferlhf.tasks.common import last_token_logits
from saferlhf.tasks.score import ScoreModule
from saferlhf.tasks.sft import response_nll
from tests.tiny import benchmark_tokenizer, micro_model_cfg


def test_pack_sequences_lays_each_sequence_whole_with_positions_from_zero():
    sequences = [[1] * 5, [2] * 3, [3] * 6, [4] * 2, [5] * 4]
    labels = [[10 + i] * len(s) for i, s in enumerate(sequences)]
    packed = pack_sequences(sequences, capacity=8, pad_token_id=0, labels=labels)
    # First-fit decreasing: 6+2, 5+3, 4 -> three rows, as wide as the fullest.
    assert packed.input_ids.shape == (3, 8)
    flat_ids, flat_positions = packed.input_ids.flatten(), packed.position_ids.flatten()
    flat_labels = packed.labels.flatten()
    for i, sequence in enumerate(sequences):
        end = int(packed.ends[i])
        span = slice(end - len(sequence) + 1, end + 1)
        assert flat_ids[span].tolist() == sequence
        assert flat_positions[span].tolist() == list(range(len(sequence)))
        # Nothing in a sequence predicts its first token: only the rest keep their labels.
        assert flat_labels[span].tolist() == [-100] + labels[i][1:]
    # The last row's unused end is padding, numbered from 0 as a sequence of its own.
    assert packed.input_ids[2].tolist() == [5] * 4 + [0] * 4
    assert packed.position_ids[2].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert (packed.labels[2, 4:] == -100).all()


def test_pack_sequences_refuses_a_sequence_longer_than_a_row():
    with pytest.raises(ValueError, match="9 tokens does not fit rows of 8"):
        pack_sequences([[1] * 9], capacity=8, pad_token_id=0)


@pytest.fixture(scope="module")
def tokenizer():
    return benchmark_tokenizer(num_train=100, vocab_size=512)


@pytest.fixture(scope="module")
def rows():
    return generate_benchmark(
        num_train=24, num_test=1, seed=3, label_noise=0.0, benign_fraction=0.35
    )["train"]


def test_packed_sft_loss_and_gradients_equal_the_padded_ones(tokenizer, rows):
    examples = tokenize_sft_examples(
        tokenizer, [r["prompt"] for r in rows], [r["response_0"] for r in rows], 128
    )
    items = list(zip(examples, [1.0] * (len(rows) - 2) + [0.0] * 2, strict=True))  # 2 padding
    padded = LanguageModelingCollator(tokenizer.pad_token_id)(items)
    packed = LanguageModelingCollator(tokenizer.pad_token_id, pack_length=128)(items)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # less padding
    torch.manual_seed(0)
    model = build_causal_lm(micro_model_cfg(), tokenizer)
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        nll, count = response_nll(model, batch)
        nll.backward()
        results.append((nll.detach(), count, [p.grad.clone() for p in model.parameters()]))
    (padded_nll, padded_count, padded_grads), (packed_nll, packed_count, packed_grads) = results
    assert packed_count == padded_count
    torch.testing.assert_close(packed_nll, padded_nll, rtol=1e-5, atol=1e-4)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_pair_scores_equal_the_padded_ones(tokenizer, rows):
    prompts = [r["prompt"] for r in rows]
    firsts = tokenize_conversations(tokenizer, prompts, [r["response_0"] for r in rows], 128)
    seconds = tokenize_conversations(tokenizer, prompts, [r["response_1"] for r in rows], 128)
    items = [
        ({"first": f, "second": s, "signs": (1.0, -1.0), "gold": (0.0, 0.0)}, 1.0)
        for f, s in zip(firsts, seconds, strict=True)
    ]
    torch.manual_seed(0)
    model = build_score_model(micro_model_cfg(), tokenizer)
    scorer = ScoreModule(model, "reward", lr=0.0, weight_decay=0.0, warmup_ratio=0.0, reg=0.0)
    padded = scorer(PairCollator(tokenizer.pad_token_id)(items))
    packed = scorer(PairCollator(tokenizer.pad_token_id, pack_length=128)(items))
    assert padded.shape == packed.shape == (2 * len(rows),)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_packed_moderation_logits_equal_the_padded_ones(tokenizer, rows):
    prompts = [r["prompt"] for r in rows]
    conversations = tokenize_conversations(tokenizer, prompts, [r["response_1"] for r in rows], 128)
    items = [
        ({"input_ids": ids, "categories": [0.0] * 3, "is_safe": True, "severity": 0}, 1.0)
        for ids in conversations
    ]
    torch.manual_seed(0)
    model = build_score_model(micro_model_cfg(), tokenizer, num_labels=7).eval()
    padded = ItemCollator(tokenizer.pad_token_id)(items)
    packed = ItemCollator(tokenizer.pad_token_id, pack_length=128)(items)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert torch.equal(packed["severity"], padded["severity"])  # labels stay per item
    with torch.no_grad():
        expected = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]
        ).logits
        torch.testing.assert_close(last_token_logits(model, packed), expected, rtol=1e-5, atol=1e-5)


def test_packing_is_refused_for_remote_code_models(compose_cfg):
    from saferlhf.config import validate_config

    with pytest.raises(ConfigError, match="model.pack_sequences=true"):
        validate_config(compose_cfg("model.trust_remote_code=true"))
    validate_config(compose_cfg("model.trust_remote_code=true", "model.pack_sequences=false"))
