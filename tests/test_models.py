import pytest
import torch
from pytorch_lightning.callbacks import Callback
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from saferlhf.data.benchmark import generate_benchmark
from saferlhf.data.collate import tokenize_sft_examples
from saferlhf.data.module import LanguageModelingCollator
from saferlhf.models import (
    build_causal_lm,
    build_score_model,
    build_tokenizer,
    count_parameters,
    linear_lm_head,
    save_artifact,
)
from saferlhf.tasks.sft import response_nll
from tests.tiny import benchmark_tokenizer, micro_model_cfg, save_micro_artifacts


@pytest.fixture(scope="module")
def texts():
    rows = generate_benchmark(
        num_train=300, num_test=10, seed=0, label_noise=0.0, benign_fraction=0.35
    )["train"]
    return [row["prompt"] for row in rows] + [row[f"response_{i}"] for row in rows for i in (0, 1)]


@pytest.fixture
def tiny(compose_cfg):
    return compose_cfg().model


def test_bpe_tokenizer_from_data_has_distinct_pad_and_round_trips_any_text(tiny, texts):
    tokenizer = build_tokenizer(tiny, texts)
    assert len(tokenizer) <= tiny.tokenizer.vocab_size
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert None not in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    for text in (texts[0], texts[-1], "ünïcode ✓ and words never seen: zyxw"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # Trained on the data, common words are single tokens.
    sample = texts[1]
    assert len(tokenizer(sample)["input_ids"]) <= len(sample.split()) * 2


def test_tiny_policy_and_score_model_shapes(tiny, texts):
    tokenizer = build_tokenizer(tiny, texts)
    policy = build_causal_lm(tiny, tokenizer)
    scorer = build_score_model(tiny, tokenizer)
    assert 100_000 <= count_parameters(policy) <= 3_000_000
    assert (
        policy.config.hidden_size == tiny.arch.hidden_size
        and policy.config.pad_token_id == tokenizer.pad_token_id
    )
    batch = tokenizer([texts[0], texts[1]], return_tensors="pt", padding=True)
    assert policy(**batch).logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert scorer(**batch).logits.shape == (2, 1)


def test_artifacts_load_with_plain_transformers_and_by_name_or_path(
    compose_cfg, tiny, texts, tmp_path
):
    tokenizer = build_tokenizer(tiny, texts)
    torch.manual_seed(0)
    scorer = build_score_model(tiny, tokenizer).eval()
    policy = build_causal_lm(tiny, tokenizer).eval()
    save_artifact(scorer, tokenizer, tmp_path / "reward")
    save_artifact(policy, tokenizer, tmp_path / "policy")
    assert (tmp_path / "reward" / "model.safetensors").exists()
    assert (tmp_path / "reward" / "tokenizer.json").exists()

    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "reward")
    plain_scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward").eval()
    batch = plain_tokenizer(texts[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain_scorer(**batch).logits, scorer(**batch).logits)

    # A local folder goes through the same loading code as a hub id.
    local = compose_cfg(f"model.name_or_path={tmp_path / 'policy'}").model
    loaded_tokenizer = build_tokenizer(local, texts=[])
    loaded_policy = build_causal_lm(local, loaded_tokenizer).eval()
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert isinstance(
        loaded_policy, type(AutoModelForCausalLM.from_pretrained(tmp_path / "policy"))
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded_policy(**batch).logits, policy(**batch).logits)


@pytest.mark.parametrize(
    "model, task_lr, actor_lr",
    [
        ("tiny", {"sft": 3e-3, "reward": 2e-3, "cost": 2e-3, "dpo": 3e-5}, 1e-4),
        ("qwen2_5_0_5b", {"sft": 2e-5, "reward": 2e-5, "cost": 2e-5, "dpo": 1e-6}, 1e-5),
        ("llama3_8b", {"sft": 2e-5, "reward": 2e-5, "cost": 2e-5, "dpo": 1e-6}, 1e-5),
    ],
)
def test_a_model_preset_brings_the_learning_rates_of_its_scale(
    compose_cfg, model, task_lr, actor_lr
):
    """From-scratch rates would wreck a pretrained model: each task takes its rate from the
    model preset, and a command-line value still wins."""
    learned = {task: compose_cfg(f"model={model}", f"task={task}").task.lr for task in task_lr}
    assert learned == pytest.approx(task_lr)
    assert compose_cfg(f"model={model}", "task=ppo").algo.actor_lr == pytest.approx(actor_lr)
    assert compose_cfg(f"model={model}", "task=sft", "task.lr=0.5").task.lr == 0.5


class _TrainingModes(Callback):
    """Records, at the first training batch, whether every module of the trained model is in
    training mode."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.all_training = all(m.training for m in pl_module.model.modules())


@pytest.mark.parametrize("task", ["sft", "reward", "moderation"])
def test_a_model_loaded_from_a_folder_trains_in_training_mode(compose_cfg, tmp_path, task):
    """from_pretrained returns a model in eval mode (dropout off); Lightning keeps the modes
    it finds, so each task has to put its model in training mode itself."""
    from saferlhf.cli import run

    artifacts = save_micro_artifacts(tmp_path / "artifacts")
    cfg = compose_cfg(
        f"task={task}", f"init.policy={artifacts / 'policy'}", "logger=none",
        "trainer.enable_progress_bar=false", "task.max_epochs=1",
        "data.benchmark.num_train=64", "data.benchmark.num_test=16",
    )  # fmt: skip
    modes = _TrainingModes()
    run(cfg, tmp_path / "run", callbacks=[modes])
    assert modes.all_training


def _sft_batch(tokenizer, rows: int = 6) -> dict[str, torch.Tensor]:
    items = generate_benchmark(
        num_train=rows, num_test=1, seed=3, label_noise=0.0, benign_fraction=0.35
    )["train"]
    examples = tokenize_sft_examples(
        tokenizer, [r["prompt"] for r in items], [r["response_0"] for r in items], 128
    )
    weights = [1.0] * (rows - 1) + [0.0]  # the last row is sampler padding: no loss
    return LanguageModelingCollator(tokenizer.pad_token_id)(
        list(zip(examples, weights, strict=True))
    )


def _nll_from_full_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = (labels != -100) & (batch["weight"][:, None] > 0)
    logps = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(logps * mask).sum(), mask.sum()


def test_sft_loss_puts_only_label_positions_through_the_head_with_the_full_logits_numbers():
    tokenizer = benchmark_tokenizer(num_train=100, vocab_size=512)
    torch.manual_seed(0)
    model = build_causal_lm(micro_model_cfg(), tokenizer)
    batch = _sft_batch(tokenizer)
    labelled = ((batch["labels"][:, 1:] != -100) & (batch["weight"][:, None] > 0)).sum()
    assert 0 < labelled < batch["labels"][:, 1:].numel() / 2  # most positions are not labels
    head_rows = []
    model.lm_head.register_forward_hook(lambda head, args, out: head_rows.append(len(args[0])))

    grads = []
    for loss_fn in (response_nll, _nll_from_full_logits):
        model.zero_grad()
        nll = loss_fn(model, batch)[0]
        nll.backward()
        grads.append((nll.detach(), [p.grad.clone() for p in model.parameters()]))
    (ours, our_grads), (full, full_grads) = grads
    assert head_rows[0] == labelled  # the head saw the label positions alone
    assert response_nll(model, batch)[1] == labelled
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-4)
    for a, b in zip(our_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The hook is gone after the loss: a plain forward has every position's logits again.
    assert model(input_ids=batch["input_ids"]).logits.shape[:2] == batch["input_ids"].shape


def test_a_head_is_one_linear_map_only_without_bias_capping_or_scaling():
    tokenizer = benchmark_tokenizer(num_train=100, vocab_size=512)
    model = build_causal_lm(micro_model_cfg(), tokenizer)
    assert linear_lm_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0  # Gemma 2's: applied after the head
    assert linear_lm_head(model) is None
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    assert linear_lm_head(model) is None
