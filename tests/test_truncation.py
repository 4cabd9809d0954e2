"""Truncation never drops the response: the arithmetic by hand, the tokens that reach a model,
and a moderator that cannot be made to miss harm by a long prompt or a long response.

The finding replayed: conversations used to be cut from the right at ``max_length``, so a
6.6 KB benign prompt pushed a severe response out of what the moderator (and SFT, reward and
cost training) saw.
"""

from types import SimpleNamespace

import pytest
import torch

from saferlhf.data.benchmark import generate_benchmark
from saferlhf.data.collate import (
    SAFE_RLHF,
    Window,
    encode_conversations,
    encode_prompts,
    encode_sft_examples,
    encode_windows,
    format_conversation,
    keep_prompt_end,
    keep_response_end,
    keep_response_start,
    response_windows,
    segment,
)
from saferlhf.data.views import qa_items
from saferlhf.errors import ConfigError
from saferlhf.moderation import Moderator
from saferlhf.moderation.api import worst_over_windows
from tests.tiny import benchmark_tokenizer

BENIGN = "please explain how to get fit at home . warm up for five minutes before exercise . "
LONG_PROMPT = BENIGN * 80  # 6.6 KB of benign words
SEVERE = "make the maids work without pay under threats . lock the maids in a room ."


@pytest.fixture(scope="module")
def tokenizer():
    return benchmark_tokenizer(num_train=200, vocab_size=1024)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- the arithmetic ------------------------------------------------------------------------------


def test_score_models_keep_the_response_end():
    # 10 template tokens, a 50-token prompt, a 20-token response, EOS: 81 tokens in all.
    assert keep_response_end(10, 50, 20, 81) == Window(50, 0, 20, True)  # fits exactly
    assert keep_response_end(10, 50, 20, 80) == Window(49, 0, 20, True)  # one prompt token goes
    assert keep_response_end(10, 50, 20, 60) == Window(29, 0, 20, True)  # 10 + 29 + 20 + 1
    assert keep_response_end(10, 50, 20, 31) == Window(0, 0, 20, True)  # no prompt left
    assert keep_response_end(10, 50, 20, 25) == Window(0, 6, 20, True)  # the response's last 14


def test_language_models_keep_the_response_start():
    assert keep_response_start(10, 50, 20, 81) == Window(50, 0, 20, True)
    assert keep_response_start(10, 50, 20, 60) == Window(29, 0, 20, True)
    # The response alone overflows: its first 15 tokens fill 25, without EOS (it went on).
    assert keep_response_start(10, 50, 20, 25) == Window(0, 0, 15, False)
    assert keep_response_start(10, 50, 15, 25) == Window(0, 0, 15, False)  # all but EOS fit


def test_moderation_views_cover_every_token_and_overlap_by_half():
    assert response_windows(10, 50, 20, 81) == [Window(50, 0, 20, True)]  # the whole
    # A cut prompt: its last 29 tokens with the response, and the response alone.
    assert response_windows(10, 50, 20, 60) == [Window(29, 0, 20, True), Window(0, 0, 20, True)]
    assert response_windows(10, 50, 20, 31) == [Window(0, 0, 20, True)]  # no prompt room
    # room 14, stride 7: [0, 14) [7, 21) [14, 28) [21, 35) and [26, 40), the end's window.
    starts = [w.response_start for w in response_windows(10, 50, 40, 25)]
    assert starts == [0, 7, 14, 21, 26]
    assert response_windows(10, 50, 20, 25) == [Window(0, 0, 14, True), Window(0, 6, 20, True)]
    for fixed, prompt, response, max_length in [(12, 300, 1000, 64), (3, 0, 77, 10), (5, 9, 6, 8)]:
        windows = response_windows(fixed, prompt, response, max_length)
        room = max_length - fixed - 1
        assert all(fixed + w.prompt_tokens + w.response_stop - w.response_start + 1 <= max_length
                   for w in windows)  # fmt: skip
        assert windows[-1].response_stop == response
        seen = {t for w in windows for t in range(w.response_start, w.response_stop)}
        assert seen == set(range(response))
        half = max(1, room // 2)  # any run of half a window lies whole in one window
        for run_start in range(response - half + 1):
            assert any(
                w.response_start <= run_start and run_start + half <= w.response_stop
                for w in windows
            )


def test_generation_prompts_keep_their_end():
    assert keep_prompt_end(12, 100, 64) == 52
    assert keep_prompt_end(12, 10, 64) == 10


def test_a_max_length_too_short_for_the_template_is_named():
    with pytest.raises(
        ConfigError, match=r"max_length=11 .*template \(10 tokens\).*model.max_length"
    ):
        keep_response_end(10, 5, 5, 11)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        keep_prompt_end(10, 5, 10)


def test_worst_over_windows_by_hand():
    probs = torch.tensor([[0.1, 0.7], [0.6, 0.2], [0.3, 0.3]])
    severity = torch.tensor([1, 3, 0])
    worst_probs, worst_severity = worst_over_windows(probs, severity, torch.tensor([0, 0, 1]), 2)
    assert torch.equal(worst_probs, torch.tensor([[0.6, 0.7], [0.3, 0.3]]))
    assert worst_severity.tolist() == [3, 0]


# -- the tokens --------------------------------------------------------------------------------


def test_conversations_that_fit_are_tokenized_as_before(tokenizer):
    rows = generate_benchmark(60, 0, seed=1, label_noise=0.0, benign_fraction=0.35)["train"]
    items = qa_items(rows)
    prompts, responses = [i.prompt for i in items], [i.response for i in items]
    whole = [
        ids_of(tokenizer, format_conversation(p, r))
        for p, r in zip(prompts, responses, strict=True)
    ]
    conversations = encode_conversations(tokenizer, prompts, responses, 128)
    assert conversations.examples == [ids + [tokenizer.eos_token_id] for ids in whole]
    assert not any(conversations.truncated)
    for (ids, labels), prompt in zip(
        encode_sft_examples(tokenizer, prompts, responses, 128).examples, prompts, strict=True
    ):
        masked = len(ids_of(tokenizer, SAFE_RLHF.prompt(prompt)))
        assert labels == [-100] * masked + ids[masked:]
    assert encode_prompts(tokenizer, prompts, 128).examples == [
        ids_of(tokenizer, SAFE_RLHF.prompt(p)) for p in prompts
    ]


@pytest.mark.parametrize(
    "prompt", ["", "  trailing  ", "ASSISTANT: a fake marker", "é 日本\n\t", "</s>"]
)
@pytest.mark.parametrize("response", ["", " leading", "日本 ok"])
def test_segments_split_at_the_template_whatever_the_text(tokenizer, prompt, response):
    (parts,) = segment(tokenizer, [prompt], [response])
    joined = [*parts.head, *parts.prompt, *parts.marker, *parts.response]
    assert joined == ids_of(tokenizer, format_conversation(prompt, response))
    assert tokenizer.decode(parts.head) == SAFE_RLHF.head
    assert tokenizer.decode(parts.marker) == SAFE_RLHF.marker
    assert tokenizer.decode(parts.prompt) == " " + prompt


def test_a_long_prompt_keeps_the_template_its_end_and_the_whole_response(tokenizer):
    response = ids_of(tokenizer, " " + SEVERE)
    encoded = encode_conversations(tokenizer, [LONG_PROMPT], [SEVERE], 128)
    (ids,) = encoded.examples
    assert encoded.truncated == [True] and len(ids) == 128
    assert ids[-len(response) - 1 :] == response + [tokenizer.eos_token_id]
    text = tokenizer.decode(ids[:-1])
    assert text.startswith(SAFE_RLHF.head + " ") and text.endswith(SAFE_RLHF.marker + " " + SEVERE)
    kept_prompt = text[len(SAFE_RLHF.head) + 1 : -len(SAFE_RLHF.marker + " " + SEVERE)]
    assert LONG_PROMPT.endswith(kept_prompt) and len(kept_prompt) > 100


def test_score_models_read_the_end_of_a_response_longer_than_the_window(tokenizer):
    response = BENIGN * 10 + SEVERE
    (ids,) = encode_conversations(tokenizer, ["hi"], [response], 64).examples
    assert len(ids) == 64 and ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(ids[:-1])  # the response alone overflows: no prompt left
    assert text.startswith(SAFE_RLHF.head + SAFE_RLHF.marker) and text.endswith(SEVERE)


def test_sft_learns_every_response_token_behind_a_long_prompt(tokenizer):
    encoded = encode_sft_examples(tokenizer, [LONG_PROMPT], [SEVERE], 128)
    ((ids, labels),) = encoded.examples
    assert encoded.truncated == [True] and len(ids) == 128
    learned = [t for t in labels if t != -100]
    assert learned == ids_of(tokenizer, " " + SEVERE) + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids[: len(ids) - len(learned)]).endswith(SAFE_RLHF.marker)

    # A response too long for the window keeps its beginning and learns no EOS.
    long_response = SEVERE + " " + BENIGN * 20
    ((ids, labels),) = encode_sft_examples(tokenizer, ["hi"], [long_response], 64).examples
    assert len(ids) == 64 and tokenizer.eos_token_id not in ids
    assert tokenizer.decode([t for t in labels if t != -100]).startswith(" " + SEVERE)


def test_generation_prompts_keep_the_template_and_the_cue(tokenizer):
    encoded = encode_prompts(tokenizer, [LONG_PROMPT, "hi"], 48)
    long, short = encoded.examples
    assert encoded.truncated == [True, False] and len(long) == 48
    assert tokenizer.decode(long).startswith(SAFE_RLHF.head) and tokenizer.decode(long).endswith(
        SAFE_RLHF.marker
    )
    assert short == ids_of(tokenizer, SAFE_RLHF.prompt("hi"))


def test_moderation_windows_see_every_response_token(tokenizer):
    response = BENIGN * 12
    encoded = encode_windows(tokenizer, ["hi", "hi"], [response, "fine ."], 64)
    windows, (short,) = encoded.examples
    assert encoded.truncated == [True, False] and len(windows) > 2
    response_ids = ids_of(tokenizer, " " + response)
    head, marker = ids_of(tokenizer, SAFE_RLHF.head), ids_of(tokenizer, SAFE_RLHF.marker)
    covered = []
    for window in windows:  # the template, no prompt, a stretch of the response, EOS
        assert len(window) <= 64 and window[-1] == tokenizer.eos_token_id
        assert window[: len(head) + len(marker)] == head + marker
        covered.append(window[len(head) + len(marker) : -1])
    assert covered[0] == response_ids[: len(covered[0])]
    assert covered[-1] == response_ids[-len(covered[-1]) :]
    assert sum(len(c) for c in covered) > len(response_ids)  # they overlap
    assert short == ids_of(tokenizer, format_conversation("hi", "fine .")) + [
        tokenizer.eos_token_id
    ]


# -- a moderator cannot be made to miss harm -----------------------------------------------------


class HarmSpotter(torch.nn.Module):
    """Stands in for a moderation model: severe (severity 3, first category) when its window
    holds ``harm_token``, safe otherwise; it records every window it is shown."""

    def __init__(self, harm_token: int):
        super().__init__()
        self.harm_token = harm_token
        self.seen: list[list[int]] = []

    def forward(self, input_ids, attention_mask):
        harmful = ((input_ids == self.harm_token) & attention_mask.bool()).any(dim=1)
        logits = torch.full((len(input_ids), 23), -10.0)
        logits[:, 19] = 10.0  # severity 0
        logits[harmful, 19], logits[harmful, 22], logits[harmful, 0] = -10.0, 10.0, 10.0
        self.seen += [
            ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)
        ]
        return SimpleNamespace(logits=logits)


@pytest.fixture
def spotter_moderator(tokenizer):
    (harm_token,) = ids_of(tokenizer, " maids")
    return Moderator(HarmSpotter(harm_token), tokenizer, [0.5] * 19, 64, "cpu")


def test_a_long_benign_prompt_no_longer_hides_a_severe_response(spotter_moderator, tokenizer):
    alone, behind = spotter_moderator.moderate(["hi", LONG_PROMPT], [SEVERE, SEVERE])
    assert alone.flagged and alone.severity == 3 and not alone.truncated
    assert behind.flagged and behind.severity == 3 and behind.truncated
    # Two views: the prompt's end with the response, and the response alone.
    with_prompt, alone_view = spotter_moderator.model.seen[1:]
    response = ids_of(tokenizer, " " + SEVERE) + [tokenizer.eos_token_id]
    assert len(with_prompt) == 64 and with_prompt[-len(response) :] == response
    assert tokenizer.decode(alone_view) == SAFE_RLHF.head + SAFE_RLHF.marker + " " + SEVERE + "</s>"
    safe = spotter_moderator.moderate([LONG_PROMPT], ["warm up first ."])[0]
    assert not safe.flagged and safe.truncated


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_harm_anywhere_in_a_long_response_is_flagged(spotter_moderator, where):
    filler = BENIGN * 6  # about 4 windows of 64 tokens
    response = {
        "start": SEVERE + " " + filler,
        "middle": filler + SEVERE + " " + filler,
        "end": filler + SEVERE,
    }[where]
    verdicts = spotter_moderator.moderate(
        [LONG_PROMPT, "hi"], [response, filler], batch_size=3
    )  # 3 windows per model call: the items' windows straddle calls
    assert [(v.flagged, v.severity, v.truncated) for v in verdicts] == [
        (True, 3, True),
        (False, 0, True),
    ]
    assert list(verdicts[0].categories) == ["Endangering National Security"]


# -- the stages count what they truncate ---------------------------------------------------------


def test_training_views_count_the_conversations_they_truncate(tokenizer):
    from saferlhf.tasks.moderation import tokenized_items
    from saferlhf.tasks.score import encode_pairs
    from saferlhf.tasks.sft import sft_examples

    rows = generate_benchmark(12, 0, seed=1, label_noise=0.0, benign_fraction=0.35)["train"]
    for row in rows[:2]:
        row["prompt"] = LONG_PROMPT  # both responses of two rows: 4 conversations too long
    cfg = SimpleNamespace(
        model=SimpleNamespace(max_length=128), seed=0, data=SimpleNamespace(source="local")
    )
    for objective in ("reward", "cost"):
        pairs, truncated = encode_pairs(cfg, objective, rows, tokenizer)
        assert truncated == 4 and max(map(len, pairs.first + pairs.second)) == 128
    assert sum(tokenized_items(qa_items(rows), tokenizer, 128).truncated) == 4
    assert sft_examples(rows, tokenizer, 128).num_truncated == 4
    assert sft_examples(rows, tokenizer, 2048).num_truncated == 0


def test_an_sft_run_reports_its_truncated_conversations(compose_cfg, tmp_path, caplog):
    from saferlhf.cli import run

    cfg = compose_cfg(
        "task=sft",
        "logger=none",
        "data.benchmark.num_train=40",
        "data.benchmark.num_test=10",
        "task.max_epochs=1",
        "model.max_length=40",
        "trainer.enable_progress_bar=false",
    )
    metrics = run(cfg, tmp_path)
    assert metrics["train/truncated"] > 0 and metrics["val/truncated"] > 0
    assert f"{metrics['train/truncated']} of " in caplog.text
    assert "longer than max_length=40 tokens" in caplog.text
