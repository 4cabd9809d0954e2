"""DPO: the dual-preference pair rule, per-sequence log-probs, learning from an SFT policy."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from saferlhf.cli import run
from saferlhf.data.benchmark import generate_benchmark
from saferlhf.data.collate import SAFE_RLHF, format_conversation
from saferlhf.data.module import list_loader
from saferlhf.data.schema import empty_harm_categories
from saferlhf.data.sources import load_data
from saferlhf.data.views import PreferencePair
from saferlhf.errors import ConfigError
from saferlhf.losses import dpo_loss
from saferlhf.models import build_causal_lm, load_tokenizer
from saferlhf.run import read_summary
from saferlhf.tasks.dpo import (
    DPOModule,
    PreferenceCollator,
    dual_preference_pairs,
    response_log_likelihood,
    safety_first_pairs,
    tokenize_pairs,
    training_pairs,
)
from tests.rows import preference_row
from tests.tiny import benchmark_tokenizer, micro_model_cfg

SMALL = (
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "data.benchmark.num_train=400",
    "data.benchmark.num_test=100",
)

# -- the dual-preference pair rule ------------------------------------------------------------


def _safe(i: int) -> dict:
    return {
        f"is_response_{i}_safe": True,
        f"response_{i}_harm_category": empty_harm_categories(),
        f"response_{i}_severity_level": 0,
    }


def _unsafe(i: int) -> dict:
    harmful = empty_harm_categories()
    harmful["Violence"] = True
    return {
        f"is_response_{i}_safe": False,
        f"response_{i}_harm_category": harmful,
        f"response_{i}_severity_level": 2,
    }


ROW_CASES = {
    # name: (row fields, the id of the chosen response)
    "only 1 unsafe, 1 more helpful": ({**_safe(0), **_unsafe(1), "better_response_id": 1}, 0),
    "only 0 unsafe, 0 more helpful": (
        {**_unsafe(0), **_safe(1), "better_response_id": 0, "safer_response_id": 1},
        1,
    ),
    "both safe: the more helpful": ({**_safe(0), **_safe(1), "better_response_id": 1}, 1),
    "both unsafe: the safer": (
        {**_unsafe(0), **_unsafe(1), "better_response_id": 0, "safer_response_id": 1},
        1,
    ),
}


@pytest.mark.parametrize("case", ROW_CASES)
def test_safety_first_puts_harmlessness_before_helpfulness(case):
    fields, chosen = ROW_CASES[case]
    row = preference_row(response_0="answer zero .", response_1="answer one .", **fields)
    # better and safer disagree in every case, so each branch is told apart from the others
    assert row["better_response_id"] != row["safer_response_id"]
    expected = PreferencePair(
        row["prompt"], row[f"response_{chosen}"], row[f"response_{1 - chosen}"]
    )
    assert safety_first_pairs([row]) == [expected]
    assert dual_preference_pairs([row], "safety_first") == [expected]


def test_unknown_dual_rule_is_named(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="task.dual_rule='helpful_first'"):
        dual_preference_pairs([preference_row()], "helpful_first")
    cfg = compose_cfg("task=dpo", *SMALL, f"init.policy={tmp_path}", "task.dual_rule=nope")
    with pytest.raises(ConfigError, match="task.dual_rule='nope'"):
        run(cfg, tmp_path / "run")


def test_missing_init_policy_is_named(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="init.policy"):
        run(compose_cfg("task=dpo", *SMALL), tmp_path / "unset")
    with pytest.raises(FileNotFoundError, match="init.policy"):
        run(compose_cfg("task=dpo", *SMALL, f"init.policy={tmp_path / 'nowhere'}"), tmp_path / "x")


def test_dual_preference_needs_safety_labels(compose_cfg, tmp_path):
    cfg = compose_cfg("task=dpo", *SMALL, f"init.policy={tmp_path}", "data.kind=single")
    with pytest.raises(ConfigError, match=r"data.kind=single rows \(needs preference\)"):
        run(cfg, tmp_path / "run")


# -- per-sequence log-probs -------------------------------------------------------------------


def test_response_log_likelihood_matches_a_token_loop_over_the_response():
    rows = generate_benchmark(
        num_train=200, num_test=10, seed=0, label_noise=0.0, benign_fraction=0.35
    )["train"]
    tokenizer = benchmark_tokenizer(num_train=200, vocab_size=512)
    torch.manual_seed(0)
    model = build_causal_lm(micro_model_cfg(), tokenizer).eval()
    pairs = [PreferencePair(r["prompt"], r["response_0"], r["response_1"]) for r in list(rows)[:3]]
    batch = PreferenceCollator(tokenizer.pad_token_id)(
        [(example, 1.0) for example in tokenize_pairs(tokenizer, pairs, max_length=128)]
    )
    with torch.no_grad():
        batched = response_log_likelihood(model, batch)  # (2B,): chosen, then rejected

        expected = []
        for response_of in (lambda p: p.chosen, lambda p: p.rejected):
            for pair in pairs:
                prompt = tokenizer(SAFE_RLHF.prompt(pair.prompt), add_special_tokens=False)
                full = tokenizer(
                    format_conversation(pair.prompt, response_of(pair)), add_special_tokens=False
                )
                ids = full["input_ids"] + [tokenizer.eos_token_id]  # unpadded, alone
                logits = model(input_ids=torch.tensor([ids])).logits[0]
                total = 0.0
                for t in range(len(prompt["input_ids"]), len(ids)):  # response tokens and EOS
                    total += torch.log_softmax(logits[t - 1], dim=-1)[ids[t]].item()
                expected.append(total)
    assert batched.tolist() == pytest.approx(expected, abs=1e-4)


# -- learning ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from saferlhf import CONF_DIR
    from saferlhf.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=sft", *SMALL, "task.max_epochs=2"])
    run_dir = tmp_path_factory.mktemp("sft")
    run(cfg, run_dir)
    return Path(read_summary(run_dir)["artifacts"]["policy"])


def _dpo(compose_cfg, policy: Path, *overrides):
    return compose_cfg("task=dpo", *SMALL, f"init.policy={policy}", *overrides)


def _held_out_margins(cfg, policy: Path, reference: Path) -> torch.Tensor:
    """Implied reward margins on the test split's pairs, ``(num_pairs,)``."""
    tokenizer = load_tokenizer(str(reference))
    rows = load_data(cfg.data).splits["test"]
    examples = tokenize_pairs(tokenizer, training_pairs(cfg, rows), cfg.model.max_length)
    module = DPOModule(
        AutoModelForCausalLM.from_pretrained(policy),
        AutoModelForCausalLM.from_pretrained(reference),
        cfg.task.beta,
        lr=0.0,
        weight_decay=0.0,
        warmup_ratio=0.0,
    ).eval()
    margins = []
    with torch.no_grad():
        loader = list_loader(examples, PreferenceCollator(tokenizer.pad_token_id), 64, False, 0)
        for batch in loader:
            out = dpo_loss(*module._log_probs(batch).unbind(dim=1), beta=cfg.task.beta)
            margins.append(out.chosen_rewards - out.rejected_rewards)
    return torch.cat(margins)


@pytest.mark.parametrize("preference", ["dual", "single"])
def test_dpo_learns_held_out_preferences_and_exports_a_policy(
    compose_cfg, sft_policy, tmp_path, preference
):
    cfg = _dpo(compose_cfg, sft_policy, f"preference={preference}")
    # Before training the policy is the reference: every implied margin is exactly 0, so no
    # held-out pair is ranked right (a coin would rank half).
    before = _held_out_margins(cfg, sft_policy, sft_policy)
    assert torch.equal(before, torch.zeros_like(before)) and len(before) == 100

    metrics = run(cfg, tmp_path)
    assert metrics["val/reward_accuracy"] >= 0.62  # measured 0.69-0.70 (dual, single)
    assert metrics["val/reward_margin"] > 0 and metrics["val/loss"] < math.log(2)
    summary = read_summary(tmp_path)
    artifact = Path(summary["artifacts"]["policy"])
    after = _held_out_margins(cfg, artifact, sft_policy)  # the exported (best) policy
    assert (after > 0).float().mean().item() == pytest.approx(metrics["val/reward_accuracy"])

    trained = load_file(artifact / "model.safetensors")
    start = load_file(sft_policy / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    checkpoint = torch.load(summary["artifacts"]["checkpoint"], weights_only=False)
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])
    # Gold metrics of the SFT policy and the DPO policy on the same fixed prompts. This SFT
    # policy (26 steps) still writes unparseable text, so only their presence is checked here.
    for stage in ("initial", "final"):
        assert 0.0 <= metrics[f"{stage}/gold/unsafe_rate"] <= 1.0
