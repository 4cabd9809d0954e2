"""model.prompt_template=chat: a pretrained instruct model's own chat template, its end-of-turn
token as EOS, and a pad token that was its EOS, through SFT, reward, cost and PPO-Lagrangian."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saferlhf.cli import run
from saferlhf.data.collate import SAFE_RLHF, encode_prompts, encode_sft_examples, template_of
from saferlhf.errors import ConfigError
from saferlhf.models import build_causal_lm, load_tokenizer
from saferlhf.rl.rollout import sample_responses
from saferlhf.run import read_summary
from tests.tiny import benchmark_tokenizer, micro_model_cfg

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_DATA = ("data.benchmark.num_train=200", "data.benchmark.num_test=40")
SFT_DATA = ("data.benchmark.num_train=600", "data.benchmark.num_test=40")


@pytest.fixture(scope="module")
def instruct_folder(tmp_path_factory) -> Path:
    """A folder as a hub instruct model ships: ChatML chat template, EOS <|im_end|> and the pad
    token equal to it (as SmolLM2-Instruct's), saved by plain transformers."""
    tokenizer = benchmark_tokenizer(num_train=400, vocab_size=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    model_cfg = micro_model_cfg()  # as wide as the tiny preset, so that SFT learns in seconds
    model_cfg.arch = dict(model_cfg.arch, hidden_size=64, intermediate_size=256)
    model = build_causal_lm(model_cfg, tokenizer)
    folder = tmp_path_factory.mktemp("instruct")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_chat_template_is_split_around_the_prompt(instruct_folder):
    tokenizer = load_tokenizer(str(instruct_folder), prompt_template="chat")
    template = template_of(tokenizer)
    assert (template.head, template.marker) == (
        "<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    )
    assert template.conversation("hi", "hello") == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
    )


def test_chat_makes_the_end_of_turn_token_eos_and_adds_a_distinct_pad(instruct_folder):
    tokenizer = load_tokenizer(str(instruct_folder), prompt_template="chat")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    safe = load_tokenizer(str(instruct_folder), prompt_template="safe_rlhf")
    assert safe.chat_template is None and template_of(safe) == SAFE_RLHF


def test_chat_needs_a_chat_template(tmp_path):
    tokenizer = benchmark_tokenizer(num_train=50, vocab_size=300)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.prompt_template=chat: the tokenizer of"):
        load_tokenizer(str(tmp_path), prompt_template="chat")


def test_sft_examples_end_at_the_end_of_turn_and_learn_the_response_alone(instruct_folder):
    tokenizer = load_tokenizer(str(instruct_folder), prompt_template="chat")
    prompt, response = "how can i grow tomatoes ?", "water them every day ."
    ((ids, labels),) = encode_sft_examples(tokenizer, [prompt], [response], 128).examples
    expected = tokenizer(
        template_of(tokenizer).conversation(prompt, response), add_special_tokens=False
    )["input_ids"]
    assert ids == [*expected, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    learned = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(learned) == "water them every day .<|im_end|>"


def test_a_long_prompt_gives_way_and_the_generation_prompt_stays(instruct_folder):
    tokenizer = load_tokenizer(str(instruct_folder), prompt_template="chat")
    prompt = " ".join(["tell me how to plan a long trip ."] * 20)
    (ids,) = encode_prompts(tokenizer, [prompt], 40).examples
    text = tokenizer.decode(ids)
    assert len(ids) == 40
    assert text.startswith("<|im_start|>user\n")
    assert text.endswith("trip .<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_sft_reward_cost_and_ppo_lagrangian_run_on_an_instruct_model(
    compose_cfg, instruct_folder, tmp_path
):
    chat = ("model.prompt_template=chat", "logger=none", "trainer.enable_progress_bar=false")
    run(
        compose_cfg("task=sft", f"init.policy={instruct_folder}", "task.max_epochs=5", *SFT_DATA, *chat),
        tmp_path / "sft",
    )  # fmt: skip
    policy = read_summary(tmp_path / "sft")["artifacts"]["policy"]
    for name in ("reward", "cost"):
        stage = compose_cfg(f"task={name}", f"init.policy={policy}", "task.max_epochs=1", *TINY_DATA, *chat)  # fmt: skip
        run(stage, tmp_path / name)
    reward = read_summary(tmp_path / "reward")["artifacts"]["reward"]
    cost = read_summary(tmp_path / "cost")["artifacts"]["cost"]
    ppo = compose_cfg(
        "task=ppo", f"init.policy={policy}", f"init.reward={reward}", f"init.cost={cost}",
        "algo.iterations=2", "algo.rollout_batch_size=8", "algo.minibatch_size=4",
        "algo.ptx_batch_size=4", "eval.num_prompts=8", "eval.sampling.max_new_tokens=24",
        *TINY_DATA, *chat,
    )  # fmt: skip
    run(ppo, tmp_path / "ppo")
    actor = read_summary(tmp_path / "ppo")["artifacts"]["policy"]

    # Every artifact carries the chat template, with the end-of-turn token as EOS.
    for folder in (policy, reward, cost, actor):
        assert json.loads((Path(folder) / "config.json").read_text())[
            "saferlhf_prompt_template"
        ] == ("chat")
        plain = AutoTokenizer.from_pretrained(folder)
        assert plain.chat_template and plain.eos_token == "<|im_end|>"

    # Trained, the policy learnt to end its turn: sampled answers stop at <|im_end|>.
    def ended_share(folder) -> float:
        tokenizer = load_tokenizer(str(folder))
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        prompts = ["how can i grow tomatoes ?", "what is a good way to save money ?"] * 16
        torch.manual_seed(0)
        rollout = sample_responses(
            model, tokenizer, encode_prompts(tokenizer, prompts, 64).examples, 48, 1.0, 0, 1.0
        )
        responses = rollout.input_ids[:, rollout.prompt_width :]
        return (responses == tokenizer.eos_token_id).any(-1).float().mean().item()

    before, after = ended_share(instruct_folder), ended_share(actor)
    print(
        f"answers ending their turn within 48 tokens: {before:.2f} untrained, {after:.2f} trained"
    )
    assert after >= before + 0.4

    # A later stage that forgets the template is refused, naming the key.
    with pytest.raises(ConfigError, match="was trained with model.prompt_template=chat"):
        run(
            compose_cfg("task=reward", f"init.policy={policy}", "logger=none", *TINY_DATA),
            tmp_path / "forgot",
        )
