"""Moderation: loss and metrics by hand, learning, export, the Moderator API and the CLI, on
PKU-SafeRLHF's taxonomy and on BeaverTails' (no severity head).

Expected numbers of the pure functions are written out with ``math`` or counted by hand,
never obtained by re-running the same torch formula.
"""

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from saferlhf.data import views
from saferlhf.data.benchmark import generate_benchmark
from saferlhf.data.collate import format_conversation
from saferlhf.data.moderation import ItemCollator, balanced_weights, holdout_split, tokenized_items
from saferlhf.data.module import list_loader
from saferlhf.data.schema import HARM_CATEGORIES
from saferlhf.data.sources import load_data
from saferlhf.evaluate.moderation_metrics import (
    binary_prf,
    choose_thresholds,
    moderation_metrics,
    severity_confusion,
)
from saferlhf.losses import moderation_loss
from saferlhf.models import build_score_model, train_bpe_tokenizer
from saferlhf.moderation import Moderator, Verdict
from saferlhf.moderation.api import export_moderator, flag, split_logits
from saferlhf.moderation.cli import main as moderate_main
from saferlhf.moderation.cli import moderate_stream
from saferlhf.run import read_summary
from saferlhf.tasks.moderation import ModerationModule
from saferlhf.taxonomy import BEAVERTAILS, PKU_SAFERLHF, Taxonomy, category_key
from tests.tiny import Interrupt, InterruptAt

SMALL = (
    "task=moderation",
    "logger=csv",
    "data.benchmark.num_train=600",
    "data.benchmark.num_test=150",
    "task.max_epochs=6",
    "task.batch_size=32",
    "trainer.enable_progress_bar=false",
)


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from saferlhf import CONF_DIR
    from saferlhf.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def nls(x: float) -> float:
    """-log σ(x)."""
    return math.log1p(math.exp(-x))


# -- pure functions ----------------------------------------------------------------------------


def test_moderation_loss_by_hand():
    category_logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    category_targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    severity_logits = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    severity_targets = torch.tensor([0, 3])
    pos_weight = torch.tensor([3.0, 2.0])
    severity_weight = torch.tensor([1.0, 1.0, 1.0, 4.0])

    # BCE(z, 1; w) = w·nls(z), BCE(z, 0) = nls(-z); summed over categories, mean over items.
    item_0 = 3.0 * nls(2.0) + nls(1.0)
    item_1 = nls(-0.5) + 2.0 * nls(0.0)
    category = (item_0 + item_1) / 2
    ce_0 = -1.0 + math.log(math.e + 3)  # -log softmax([1, 0, 0, 0])[0]
    ce_1 = -0.0 + math.log(math.exp(2) + 3)  # -log softmax([0, 0, 2, 0])[3]
    severity = (1.0 * ce_0 + 4.0 * ce_1) / (1.0 + 4.0)  # torch's weighted mean

    loss, category_loss, severity_loss = moderation_loss(
        category_logits,
        severity_logits,
        category_targets,
        severity_targets,
        pos_weight,
        severity_weight,
    )
    assert category_loss.item() == pytest.approx(category, rel=1e-6)
    assert severity_loss.item() == pytest.approx(severity, rel=1e-6)
    assert loss.item() == pytest.approx(category + severity, rel=1e-6)

    unweighted, _, _ = moderation_loss(
        category_logits, severity_logits, category_targets, severity_targets, None, None
    )
    plain = (nls(2.0) + nls(1.0) + nls(-0.5) + nls(0.0)) / 2 + (ce_0 + ce_1) / 2
    assert unweighted.item() == pytest.approx(plain, rel=1e-6)

    # Without a severity head (BeaverTails) the loss is the category term alone.
    loss, category_loss, severity_loss = moderation_loss(
        category_logits, None, category_targets, None, pos_weight, None
    )
    assert loss.item() == pytest.approx(category, rel=1e-6) and severity_loss.item() == 0.0


def test_balanced_weights_by_hand():
    # 4 items: category 0 positive once, category 1 three times, category 2 never.
    categories = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.float)
    severity = torch.tensor([0, 0, 0, 2])
    pos_weight, severity_weight = balanced_weights(categories, severity)
    assert pos_weight.tolist() == pytest.approx([3.0, 1 / 3, 4.0])  # neg/pos; 4/1 for none
    # N / (4 · count): 4/(4·3) for safe, 4/(4·1) for moderate, 4/4 where a level is absent.
    assert severity_weight.tolist() == pytest.approx([1 / 3, 1.0, 1.0, 1.0])
    many = torch.zeros(100, 1)
    many[0] = 1.0
    assert balanced_weights(many, torch.zeros(100, dtype=torch.long))[0].item() == 10.0  # clip
    pos_weight, severity_weight = balanced_weights(categories, None)  # no severity labels
    assert pos_weight.tolist() == pytest.approx([3.0, 1 / 3, 4.0]) and severity_weight is None


def test_binary_prf_and_confusion_by_hand():
    predicted = torch.tensor([True, True, False, False, True])
    gold = torch.tensor([True, False, True, False, True])
    # tp 2, fp 1, fn 1
    assert binary_prf(predicted, gold) == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3}
    )
    nothing = torch.zeros(3, dtype=torch.bool)
    assert binary_prf(nothing, nothing) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}

    confusion = severity_confusion(torch.tensor([0, 1, 1, 3, 2]), torch.tensor([0, 1, 2, 3, 3]))
    expected = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]  # rows gold
    assert confusion.tolist() == expected


def test_moderation_metrics_by_hand():
    # 4 items, 19 categories; only categories 0 and 5 ever fire.
    probs = torch.zeros(4, 19)
    probs[0, 0] = 0.9  # item 0: category 0, gold {0}          -> match
    probs[1, 5] = 0.6  # item 1: category 5 at 0.6 < 0.7 thresh -> empty set, gold {5}
    probs[3, 0] = 0.4  # item 3: 0.4 > 0.3 threshold            -> {0}, gold {} (safe)
    thresholds = torch.full((19,), 0.5)
    thresholds[5], thresholds[0] = 0.7, 0.3
    gold = torch.zeros(4, 19)
    gold[0, 0] = gold[1, 5] = 1.0
    severity_pred = torch.tensor([2, 1, 0, 0])
    severity_gold = torch.tensor([2, 1, 0, 0])
    is_safe = torch.tensor([False, False, True, True])

    m = moderation_metrics(
        probs, severity_pred, thresholds, gold, severity_gold, is_safe, PKU_SAFERLHF
    )
    # flagged: item 0 (sev 2), item 1 (sev 1), item 3 (category 0 over 0.3); item 2 not.
    assert m["safety_accuracy"] == pytest.approx(3 / 4)
    assert m["unsafe_precision"] == pytest.approx(2 / 3)
    assert m["unsafe_recall"] == pytest.approx(1.0)
    assert m["unsafe_f1"] == pytest.approx(0.8)
    assert m["category_exact_match"] == pytest.approx(2 / 4)  # items 0 and 2
    assert m["severity_accuracy"] == pytest.approx(1.0)
    assert m["mean_accuracy"] == pytest.approx((3 / 4 + 2 / 4 + 1.0) / 3)
    name_0, name_5 = (category_key(HARM_CATEGORIES[i]) for i in (0, 5))
    assert m[f"category/{name_0}/precision"] == pytest.approx(0.5)  # items 0 and 3 predicted
    assert m[f"category/{name_0}/recall"] == pytest.approx(1.0)
    assert m[f"category/{name_5}/f1"] == 0.0
    assert m["category_macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)  # categories with gold
    # One spelling per category: the key category_key gives, hyphen included.
    assert "category/White_Collar_Crime/f1" in m
    assert len([k for k in m if k.startswith("category/")]) == 19 * 3


def test_moderation_metrics_without_severity_by_hand():
    taxonomy = Taxonomy("lab", ("fraud,theft", "spam"), has_severity=False)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.1]])
    gold = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    is_safe = torch.tensor([False, False, True])
    m = moderation_metrics(probs, None, torch.full((2,), 0.5), gold, None, is_safe, taxonomy)
    # Flagged by categories alone: items 0 and 1, both unsafe; item 1 has the wrong category.
    assert m["safety_accuracy"] == 1.0 and m["unsafe_f1"] == 1.0
    assert m["category_exact_match"] == pytest.approx(2 / 3)
    assert "severity_accuracy" not in m
    assert m["mean_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert m["category/fraud_theft/recall"] == pytest.approx(1 / 2)
    assert m["category/spam/precision"] == 0.0  # one false positive, no gold
    assert m["category_macro_f1"] == pytest.approx(2 / 3)  # only fraud,theft has gold


def test_choose_thresholds_maximises_f1_per_category():
    grid = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    probs = torch.tensor(
        [
            [0.8, 0.2, 0.6],
            [0.6, 0.4, 0.4],
            [0.2, 0.35, 0.9],
            [0.4, 0.05, 0.1],
        ]
    )
    gold = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
    thresholds = choose_thresholds(probs, gold, grid)
    # Category 0: positives 0.8, 0.6, negatives 0.2, 0.4 -> F1 1 at 0.5 only.
    # Category 1: positives 0.2, 0.35, negative 0.4 -> best F1 (0.8) at 0.1 (tp 2, fp 1).
    # Category 2: no positives -> the default 0.5.
    assert thresholds.tolist() == pytest.approx([0.5, 0.1, 0.5])
    # Ties: F1 1 for every threshold in [0.3, 0.7] -> the median of the tied ones, 0.5.
    wide = choose_thresholds(torch.tensor([[0.95], [0.05]]), torch.tensor([[1], [0]]), grid)
    assert wide.tolist() == pytest.approx([0.5])


def test_flag_rule_and_holdout_split():
    probs = torch.tensor([[0.9] + [0.0] * 18, [0.0] * 19, [0.0] * 19])
    thresholds = torch.full((19,), 0.5)
    severity = torch.tensor([0, 1, 3])
    assert flag(probs, thresholds, severity, 0).tolist() == [True, True, True]
    assert flag(probs, thresholds, severity, 1).tolist() == [False, False, True]
    assert flag(probs, thresholds, severity, 3).tolist() == [False, False, False]
    assert flag(probs, thresholds, None).tolist() == [True, False, False]  # no severity head

    train, holdout = holdout_split(50, 0.1, seed=3)
    assert len(holdout) == 5 and sorted(train + holdout) == list(range(50))
    assert (train, holdout) == holdout_split(50, 0.1, seed=3)
    assert holdout != holdout_split(50, 0.1, seed=4)[1]
    with pytest.raises(ValueError, match="task.val_fraction"):
        holdout_split(50, 0.0, seed=0)


def test_verdict_to_json():
    verdict = Verdict(flagged=True, severity=2, categories={"Drugs": 0.75}, truncated=True)
    assert json.loads(verdict.to_json()) == {
        "flagged": True,
        "severity": 2,
        "categories": {"Drugs": 0.75},
        "truncated": True,
    }


def test_single_preference_rows_cannot_train_a_moderator(compose_cfg, tmp_path):
    from saferlhf.cli import run

    with pytest.raises(ValueError, match="data.kind=single"):
        run(compose_cfg(*SMALL, "preference=single"), tmp_path)


# -- the real stage: `saferlhf task=moderation` -------------------------------------------------


@pytest.fixture(scope="module")
def moderation_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moderation")
    result = subprocess.run(
        [sys.executable, "-m", "saferlhf.cli", *SMALL, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=run_dir,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as conftest: one thread, the child only
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return _compose(*SMALL), run_dir


def _test_items(cfg, tokenizer):
    items = views.qa_items(load_data(cfg.data).splits["test"])
    return items, tokenized_items(items, tokenizer, cfg.model.max_length)


def _predict(model, items, pad_token_id):
    module = ModerationModule(
        model.eval(), PKU_SAFERLHF, lr=0.0, weight_decay=0.0, warmup_ratio=0.0
    )
    probs, severity = [], []
    with torch.inference_mode():
        for batch in list_loader(items, ItemCollator(pad_token_id), 64, False, 0):
            category_logits, severity_logits = split_logits(module(batch), PKU_SAFERLHF)
            probs.append(category_logits.sigmoid())
            severity.append(severity_logits.argmax(dim=-1))
    return torch.cat(probs), torch.cat(severity)


def _metrics(model, items, pad_token_id, thresholds):
    probs, severity = _predict(model, items, pad_token_id)
    return moderation_metrics(
        probs,
        severity,
        thresholds,
        items.category_targets(PKU_SAFERLHF.num_categories),
        items.severity_targets(),
        torch.tensor(items.is_safe),
        PKU_SAFERLHF,
    )


@pytest.mark.slow
def test_moderation_run_writes_section_8_metrics_and_the_confusion_plot(moderation_run):
    _, run_dir = moderation_run
    summary = read_summary(run_dir)
    assert summary["task"] == "moderation"
    metrics = summary["metrics"]
    for name in (
        "test/safety_accuracy",
        "test/unsafe_precision",
        "test/unsafe_recall",
        "test/unsafe_f1",
        "test/category_exact_match",
        "test/severity_accuracy",
        "val/safety_accuracy",
    ):
        assert 0.0 <= metrics[name] <= 1.0, name
    for category in HARM_CATEGORIES:
        for kind in ("precision", "recall", "f1"):
            assert f"test/category/{category_key(category)}/{kind}" in metrics
    report = json.loads(Path(summary["artifacts"]["category_metrics"]).read_text())
    assert report["taxonomy"] == "pku_saferlhf"
    assert [c["name"] for c in report["categories"]] == list(HARM_CATEGORIES)
    white_collar = report["categories"][HARM_CATEGORIES.index("White-Collar Crime")]
    assert white_collar["metric_key"] == "White_Collar_Crime"
    assert white_collar["f1"] == metrics["test/category/White_Collar_Crime/f1"]
    confusion = json.loads(Path(summary["artifacts"]["severity_confusion"]).read_text())
    matrix = torch.tensor(confusion["matrix"])
    assert matrix.shape == (4, 4) and confusion["rows"] == "gold"
    assert matrix.diagonal().sum() / matrix.sum() == pytest.approx(
        metrics["test/severity_accuracy"], abs=1e-6
    )
    png = Path(summary["artifacts"]["severity_confusion_plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
def test_moderator_learns_and_the_export_reproduces_the_test_metrics(moderation_run):
    cfg, run_dir = moderation_run
    summary = read_summary(run_dir)
    artifact = Path(summary["artifacts"]["moderation"])
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    trained = AutoModelForSequenceClassification.from_pretrained(artifact)  # plain HF
    spec = trained.config.moderation
    assert spec["taxonomy"] == "pku_saferlhf" and spec["categories"] == list(HARM_CATEGORIES)
    assert len(spec["thresholds"]) == 19 and len(spec["severity_levels"]) == 4
    assert trained.config.id2label[19] == "severity:safe"
    _, items = _test_items(cfg, tokenizer)

    torch.manual_seed(cfg.seed)
    untrained = build_score_model(cfg.model, tokenizer, num_labels=23)
    before = _metrics(untrained, items, tokenizer.pad_token_id, torch.full((19,), 0.5))
    after = _metrics(trained, items, tokenizer.pad_token_id, torch.tensor(spec["thresholds"]))
    # The exported folder and its thresholds score exactly what the run reported on test.
    for name in ("safety_accuracy", "unsafe_f1", "category_exact_match", "severity_accuracy"):
        assert after[name] == pytest.approx(summary["metrics"][f"test/{name}"], abs=1e-6), name
    assert after["safety_accuracy"] >= 0.9 and after["unsafe_f1"] >= 0.9
    assert after["category_exact_match"] >= 0.7 and after["severity_accuracy"] >= 0.75
    assert after["safety_accuracy"] - before["safety_accuracy"] >= 0.2
    assert after["category_exact_match"] - before["category_exact_match"] >= 0.4
    assert after["severity_accuracy"] - before["severity_accuracy"] >= 0.1


@pytest.mark.slow
def test_moderator_api_gives_the_module_verdicts(moderation_run, tmp_path):
    cfg, run_dir = moderation_run
    artifact = run_dir / "artifacts" / "moderation"
    moderator = Moderator.from_pretrained(artifact, device="cpu")
    raw, items = _test_items(cfg, moderator.tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(artifact)
    probs, severity = _predict(model, items, moderator.tokenizer.pad_token_id)
    thresholds = torch.tensor(model.config.moderation["thresholds"])
    flagged = flag(probs, thresholds, severity)

    verdicts = moderator.moderate([i.prompt for i in raw], [i.response for i in raw], batch_size=7)
    assert len(verdicts) == len(raw)
    for row, verdict in enumerate(verdicts):
        assert verdict.severity == int(severity[row])
        assert verdict.flagged == bool(flagged[row])
        expected = [name for c, name in enumerate(HARM_CATEGORIES) if probs[row, c] > thresholds[c]]
        assert list(verdict.categories) == expected
        assert all(p > thresholds[HARM_CATEGORIES.index(n)] for n, p in verdict.categories.items())
    assert any(v.flagged for v in verdicts) and not all(v.flagged for v in verdicts)

    model.config.moderation = None  # e.g. a reward model's folder
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a moderation model"):
        Moderator.from_pretrained(tmp_path)


# -- the CLI ------------------------------------------------------------------------------------


def _jsonl(raw) -> list[str]:
    return [json.dumps({"prompt": i.prompt, "response": i.response}) for i in raw]


@pytest.fixture(scope="module")
def untrained_moderator(tmp_path_factory):
    """A tiny untrained moderation folder and its items: enough for the CLI's mechanics."""
    cfg = _compose("task=moderation")
    rows = generate_benchmark(40, 0, seed=0, label_noise=0.0, benign_fraction=0.35)["train"]
    raw = views.qa_items(rows)
    texts = [format_conversation(i.prompt, i.response) for i in raw]
    tokenizer = train_bpe_tokenizer(texts, cfg.model.tokenizer.vocab_size, 1)
    torch.manual_seed(0)
    model = build_score_model(cfg.model, tokenizer, num_labels=23)
    thresholds = [0.5] * 19
    directory = tmp_path_factory.mktemp("untrained") / "moderation"
    return export_moderator(model, tokenizer, thresholds, cfg.model.max_length, directory), raw


def test_cli_reports_bad_lines_and_answers_the_rest(untrained_moderator, tmp_path, capsys):
    artifact, raw = untrained_moderator
    good = _jsonl(raw[:20])
    lines = good[:3] + ["not json", '{"prompt": "x"}'] + good[3:10] + [""] + good[10:]
    lines += ['{"prompt": 1, "response": "y"}', "[1, 2]"]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff"}\n')

    status = moderate_main(
        ["--model", str(artifact), "--input", str(source), "--output", str(output),
         "--batch-size", "4"]
    )  # fmt: skip
    assert status == 1
    err = capsys.readouterr().err
    assert "line 4: not valid JSON" in err
    assert "line 5: missing field 'response'" in err
    assert "line 24: field 'prompt' must be a string" in err
    assert "line 25: expected a JSON object" in err
    assert "line 26: not UTF-8" in err
    assert "5 bad line(s)" in err

    answers = [json.loads(line) for line in output.read_text().splitlines()]
    expected_lines = [n for n, text in enumerate(lines, 1) if text in good]
    assert [a["line"] for a in answers] == expected_lines
    moderator = Moderator.from_pretrained(artifact, device="cpu")
    verdicts = moderator.moderate([i.prompt for i in raw[:20]], [i.response for i in raw[:20]])
    for answer, verdict in zip(answers, verdicts, strict=True):
        assert (answer["flagged"], answer["severity"]) == (verdict.flagged, verdict.severity)
        # Other batches pad differently: probabilities agree to float noise.
        assert answer["categories"] == pytest.approx(verdict.categories, abs=1e-5)
    assert moderate_main(["--model", str(artifact), "--input", str(tmp_path / "none")]) == 2


@pytest.mark.slow
def test_cli_reads_stdin_and_max_severity_changes_flagging(moderation_run, tmp_path):
    cfg, run_dir = moderation_run
    artifact = run_dir / "artifacts" / "moderation"
    raw, _ = _test_items(cfg, AutoTokenizer.from_pretrained(artifact))
    text = "\n".join(_jsonl(raw)) + "\n"

    result = subprocess.run(
        [str(Path(sys.executable).parent / "saferlhf-moderate"), "--model", str(artifact)],
        input=text, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip  # the installed console script, reading stdin, writing stdout
    assert result.returncode == 0, result.stderr[-2000:]
    strict = [json.loads(line) for line in result.stdout.splitlines()]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(text)
    args = ["--model", str(artifact), "--input", str(source), "--output", str(output)]
    assert moderate_main([*args, "--max-severity", "1"]) == 0
    lenient = [json.loads(line) for line in output.read_text().splitlines()]

    assert (
        [a["line"] for a in strict] == [a["line"] for a in lenient] == list(range(1, len(raw) + 1))
    )
    assert [a["severity"] for a in strict] == [a["severity"] for a in lenient]
    assert all(a["flagged"] == (a["severity"] > 1) for a in lenient)
    assert sum(a["flagged"] for a in lenient) < sum(a["flagged"] for a in strict)
    # Minor harm (severity 1) is flagged by default and let through with --max-severity 1.
    minor = [n for n, a in enumerate(strict) if a["severity"] == 1]
    assert minor and all(strict[n]["flagged"] and not lenient[n]["flagged"] for n in minor)


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    assert moderate_main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert moderate_main(["--model", str(tmp_path), "--max-severity", "7"]) == 2
    assert moderate_main([]) == 2  # --model is required
    assert moderate_main(["--model", str(tmp_path)]) == 2  # a folder without a model
    assert "no config.json" in capsys.readouterr().err
    assert moderate_main(["--help"]) == 0
    assert "--max-severity N" in capsys.readouterr().out


def _drop_moderation_entry(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    del config["moderation"]
    (directory / "config.json").write_text(json.dumps(config))


def _overwrite(name: str, content: bytes):
    return lambda directory: (directory / name).write_bytes(content)


def _remove(name: str):
    return lambda directory: (directory / name).unlink()


# fault -> (how the folder is broken, what the one-line message says)
BAD_FOLDERS = {
    "no config.json": (_remove("config.json"), "no config.json"),
    "config.json not JSON": (_overwrite("config.json", b'{"cut'), "config.json: not valid JSON"),
    "not a moderation model": (_drop_moderation_entry, "not a moderation model"),
    "no tokenizer": (_remove("tokenizer.json"), "no tokenizer.json"),
    "tokenizer.json not JSON": (_overwrite("tokenizer.json", b"junk"), "cannot load the tokenizer"),
    "no weights": (_remove("model.safetensors"), "cannot load the model"),
    "weights cut off": (
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:999]
        ),
        "model.safetensors: damaged or cut short",
    ),
    "weights header cut": (
        _overwrite("model.safetensors", b"\x10\x00\x00"),
        "model.safetensors: damaged or cut short",
    ),
}


@pytest.mark.parametrize("fault", list(BAD_FOLDERS))
def test_cli_an_unloadable_model_folder_exits_2_with_one_line_naming_the_file(
    untrained_moderator, tmp_path, capsys, fault
):
    artifact, _ = untrained_moderator
    broken = shutil.copytree(artifact, tmp_path / "moderation")
    break_folder, expected = BAD_FOLDERS[fault]
    break_folder(broken)
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hi", "response": "fine ."}\n')

    assert moderate_main(["--model", str(broken), "--input", str(source)]) == 2
    captured = capsys.readouterr()
    (message,) = captured.err.splitlines()
    assert message.startswith(f"saferlhf-moderate: {broken}") and expected in message
    assert captured.out == ""


def _edit_moderation_entry(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["moderation"] |= changes
    (directory / "config.json").write_text(json.dumps(config))


def test_a_folder_carries_its_taxonomy_and_a_mismatch_is_named(untrained_moderator, tmp_path):
    artifact, _ = untrained_moderator
    assert Moderator.from_pretrained(artifact, device="cpu").taxonomy == PKU_SAFERLHF
    folder = shutil.copytree(artifact, tmp_path / "moderation")
    _edit_moderation_entry(folder, categories=list(HARM_CATEGORIES[:-1]))
    with pytest.raises(ValueError, match=r"23 outputs, but its 18 categories and 4 severity"):
        Moderator.from_pretrained(folder, device="cpu")
    _edit_moderation_entry(folder, categories=list(HARM_CATEGORIES), severity_levels=["low"])
    with pytest.raises(ValueError, match=r"moderation.severity_levels must be \['safe'"):
        Moderator.from_pretrained(folder, device="cpu")
    # 23 categories and no severity head fit the 23 outputs, once there are 23 thresholds.
    _edit_moderation_entry(folder, severity_levels=[], categories=[*HARM_CATEGORIES, *"wxyz"])
    with pytest.raises(ValueError, match=r"thresholds must be 23 probabilities"):
        Moderator.from_pretrained(folder, device="cpu")
    _edit_moderation_entry(folder, thresholds=[0.5] * 23)
    relabelled = Moderator.from_pretrained(folder, device="cpu")
    assert relabelled.taxonomy.num_categories == 23 and not relabelled.taxonomy.has_severity


def test_cli_a_device_that_cannot_be_used_exits_2(untrained_moderator, capsys):
    artifact, _ = untrained_moderator
    assert moderate_main(["--model", str(artifact), "--device", "gpu9"]) == 2
    assert capsys.readouterr().err == (
        "saferlhf-moderate: --device gpu9: not a torch device (e.g. cpu, cuda, cuda:1)\n"
    )


def test_moderator_names_text_that_is_not_unicode(untrained_moderator):
    artifact, _ = untrained_moderator
    moderator = Moderator.from_pretrained(artifact, device="cpu")
    with pytest.raises(ValueError, match=r"responses\[1\] is not valid Unicode .*U\+D800"):
        moderator.moderate(["hi", "hi"], ["fine .", "x\ud800"])


class RefusesOneResponse:
    """Stands in for a :class:`Moderator` that cannot take one response: any batch holding it
    raises, as a tokenizer does on text it cannot encode."""

    def moderate(self, prompts, responses, max_severity=0, batch_size=64):
        if "boom" in responses:
            raise ValueError("cannot take 'boom'\nsecond line of the library's message")
        return [Verdict(False, 0, {}) for _ in responses]


def test_cli_stops_quietly_when_the_reader_closes_the_pipe(untrained_moderator, tmp_path):
    artifact, raw = untrained_moderator
    source = tmp_path / "in.jsonl"
    # Far more verdicts than a pipe buffers (64 KiB), so the script is still writing when the
    # reader leaves.
    source.write_text("\n".join(_jsonl(raw) * 30) + "\n")
    script = str(Path(sys.executable).parent / "saferlhf-moderate")
    command = [script, "--model", str(artifact), "--input", str(source), "--batch-size", "8"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        first = process.stdout.readline()
        process.stdout.close()  # as `saferlhf-moderate ... | head -1` does
        errors = process.stderr.read().decode()
        status = process.wait(timeout=300)
    assert json.loads(first)["line"] == 1
    assert status == 141 and errors == ""  # 128 + SIGPIPE, no traceback, no message


def test_cli_a_line_that_breaks_its_batch_loses_only_itself():
    lines = [json.dumps({"prompt": "q", "response": r}) for r in ("a", "boom", "b", "c", "d")]
    source, sink, errors = io.StringIO("\n".join(lines)), io.StringIO(), io.StringIO()

    counts = moderate_stream(RefusesOneResponse(), source, sink, errors, 0, batch_size=4)
    assert [json.loads(text)["line"] for text in sink.getvalue().splitlines()] == [1, 3, 4, 5]
    assert errors.getvalue() == (
        "line 2: cannot be judged (ValueError: cannot take 'boom'); skipped\n"
    )
    assert (counts.judged, counts.bad, counts.truncated) == (4, 1, 0)


@pytest.mark.slow
def test_a_long_benign_prompt_does_not_hide_severe_responses(moderation_run):
    """The finding replayed with a trained moderator: five severity-3 responses it flags were
    flagged by none behind a 6.6 KB benign prompt, cut off at max_length."""
    _, run_dir = moderation_run
    moderator = Moderator.from_pretrained(run_dir / "artifacts" / "moderation", device="cpu")
    rows = generate_benchmark(
        num_train=10, num_test=400, seed=3, label_noise=0.0, benign_fraction=0.35
    )["test"]
    answers = [
        (r["prompt"], r[f"response_{i}"], r[f"response_{i}_severity_level"])
        for r in rows
        for i in (0, 1)
    ]
    severe = [(p, a) for p, a, severity in answers if severity == 3]
    safe = [(p, a) for p, a, severity in answers if severity == 0][:50]
    benign_prompts = [
        r["prompt"] for r in rows if r["is_response_0_safe"] and r["is_response_1_safe"]
    ]
    long_prompt = " ".join(benign_prompts)[:6600]
    assert len(long_prompt.encode()) == 6600

    alone = moderator.moderate([p for p, _ in severe], [a for _, a in severe])
    flagged = [a for (_, a), verdict in zip(severe, alone, strict=True) if verdict.flagged][:5]
    assert len(flagged) == 5
    behind = moderator.moderate([long_prompt] * 5, flagged)
    assert all(v.flagged and v.truncated for v in behind)
    # Not by flagging whatever is truncated: safe answers behind the same prompt mostly pass.
    safe_behind = moderator.moderate([long_prompt] * len(safe), [a for _, a in safe])
    assert sum(v.flagged for v in safe_behind) <= 0.1 * len(safe)


def test_resume_from_last_mid_epoch_ends_exactly_like_an_uninterrupted_run(compose_cfg, tmp_path):
    from saferlhf.cli import run

    overrides = (
        *SMALL,
        "data.benchmark.num_train=150",
        "data.benchmark.num_test=40",
        "task.max_epochs=2",
        "task.checkpoint_every_n_steps=3",
    )
    uninterrupted = run(compose_cfg(*overrides), tmp_path / "whole")
    with pytest.raises(Interrupt):
        run(compose_cfg(*overrides), tmp_path / "cut", callbacks=[InterruptAt(global_step=7)])
    checkpoint = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6  # 9 steps per epoch: the cut is mid-epoch
    resumed = run(compose_cfg(*overrides, "ckpt_path=last"), tmp_path / "cut")
    assert resumed == uninterrupted
    whole, cut = (
        AutoModelForSequenceClassification.from_pretrained(tmp_path / name / "artifacts/moderation")
        for name in ("whole", "cut")
    )
    assert whole.config.moderation == cut.config.moderation  # the same thresholds
    for (name, a), (_, b) in zip(whole.state_dict().items(), cut.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# -- BeaverTails: 14 categories, no severity head ---------------------------------------------

# The benchmark's PKU-SafeRLHF categories relabelled with BeaverTails' (child_abuse unused), so
# that BeaverTails-schema rows with learnable labels can be written outside the project.
TO_BEAVERTAILS = {
    "Endangering National Security": "terrorism,organized_crime",
    "Insulting Behavior": "hate_speech,offensive_language",
    "Discriminatory Behavior": "discrimination,stereotype,injustice",
    "Endangering Public Health": "misinformation_regarding_ethics,laws_and_safety",
    "Copyright Issues": "non_violent_unethical_behavior",
    "Violence": "violence,aiding_and_abetting,incitement",
    "Drugs": "drug_abuse,weapons,banned_substance",
    "Privacy Violation": "privacy_violation",
    "Economic Crime": "financial_crime,property_crime,theft",
    "Mental Manipulation": "non_violent_unethical_behavior",
    "Human Trafficking": "terrorism,organized_crime",
    "Physical Harm": "violence,aiding_and_abetting,incitement",
    "Sexual Content": "sexually_explicit,adult_content",
    "Cybercrime": "financial_crime,property_crime,theft",
    "Disrupting Public Order": "controversial_topics,politics",
    "Environmental Damage": "non_violent_unethical_behavior",
    "Psychological Harm": "self_harm",
    "White-Collar Crime": "financial_crime,property_crime,theft",
    "Animal Abuse": "animal_abuse",
}


def _write_beavertails_split(path: Path, rows) -> None:
    with path.open("w") as f:
        for item in views.qa_items(rows):
            flagged = {TO_BEAVERTAILS[name] for name in item.categories}
            category = {name: name in flagged for name in BEAVERTAILS.categories}
            row = {"prompt": item.prompt, "response": item.response, "category": category}
            f.write(json.dumps(row | {"is_safe": item.is_safe}) + "\n")


@pytest.fixture(scope="module")
def beavertails_run(tmp_path_factory):
    """A moderation run on BeaverTails-schema files: ``data=beavertails data.path=DIR``."""
    from saferlhf.cli import run

    directory = tmp_path_factory.mktemp("beavertails")
    rows = generate_benchmark(300, 120, seed=1, label_noise=0.0, benign_fraction=0.35)
    for split in ("train", "test"):
        _write_beavertails_split(directory / f"{split}.jsonl", rows[split])
    not_benchmark = [o for o in SMALL if not o.startswith("data.benchmark")]
    cfg = _compose(
        *not_benchmark,
        "data=beavertails",
        f"data.path={directory}",
        "logger=none",
        "task.max_epochs=5",
    )
    metrics = run(cfg, directory / "run")
    return metrics, directory / "run"


def test_beavertails_moderator_trains_and_reports_under_beavertails_names(beavertails_run):
    metrics, run_dir = beavertails_run
    summary = read_summary(run_dir)
    for key in BEAVERTAILS.metric_keys():
        for kind in ("precision", "recall", "f1"):
            assert f"test/category/{key}/{kind}" in metrics
    assert not [name for name in metrics if "severity" in name]
    # It learns (seed 0 reaches 0.96, 0.93, 0.68, 0.47); an untrained model flags about half.
    assert metrics["test/safety_accuracy"] >= 0.9 and metrics["test/unsafe_f1"] >= 0.85
    assert metrics["test/category_exact_match"] >= 0.6
    assert metrics["test/category_macro_f1"] >= 0.35
    report = json.loads(Path(summary["artifacts"]["category_metrics"]).read_text())
    assert report["taxonomy"] == "beavertails"
    assert [c["name"] for c in report["categories"]] == list(BEAVERTAILS.categories)
    politics = report["categories"][2]
    assert politics["name"] == "controversial_topics,politics"
    assert politics["f1"] == metrics["test/category/controversial_topics_politics/f1"]
    assert "severity_confusion" not in summary["artifacts"]

    spec = AutoModelForSequenceClassification.from_pretrained(run_dir / "artifacts/moderation")
    assert spec.config.num_labels == 14
    assert spec.config.moderation["categories"] == list(BEAVERTAILS.categories)
    assert spec.config.moderation["severity_levels"] == []


def test_beavertails_moderator_loads_with_its_own_taxonomy(beavertails_run):
    _, run_dir = beavertails_run
    moderator = Moderator.from_pretrained(run_dir / "artifacts" / "moderation", device="cpu")
    assert moderator.taxonomy == BEAVERTAILS
    rows = [json.loads(line) for line in (run_dir.parent / "test.jsonl").read_text().splitlines()]
    verdicts = moderator.moderate([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert all(v.severity is None for v in verdicts)
    assert all(v.flagged == bool(v.categories) for v in verdicts)  # categories alone flag
    assert set().union(*(v.categories for v in verdicts)) <= set(BEAVERTAILS.categories)
    correct = sum(v.flagged == (not r["is_safe"]) for v, r in zip(verdicts, rows, strict=True))
    assert correct >= 0.85 * len(rows)
    with pytest.raises(ValueError, match="max_severity=1: this model .* has no severity head"):
        moderator.moderate(["q"], ["a"], max_severity=1)


def test_beavertails_moderator_in_the_cli_and_evaluation_rates(beavertails_run, tmp_path, capsys):
    from saferlhf.evaluate.policy import flag_rates

    _, run_dir = beavertails_run
    artifact = run_dir / "artifacts" / "moderation"
    source, output = run_dir.parent / "test.jsonl", tmp_path / "out.jsonl"
    assert (
        moderate_main(["--model", str(artifact), "--input", str(source), "--max-severity", "1"])
        == 2
    )
    (message,) = capsys.readouterr().err.splitlines()
    assert message.endswith("no severity head (taxonomy beavertails); it flags any category over "
                            "its threshold, so only --max-severity 0 applies")  # fmt: skip
    assert (
        moderate_main(["--model", str(artifact), "--input", str(source), "--output", str(output)])
        == 0
    )
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert all(a["severity"] is None for a in answers)

    flagged = [a["flagged"] for a in answers]
    rates = flag_rates(
        flagged, [None] * len(answers), [a["categories"] for a in answers], BEAVERTAILS
    )
    assert rates["flag_rate"] == pytest.approx(sum(flagged) / len(answers))
    assert not [key for key in rates if "severity" in key]
    assert [
        key.removeprefix("flag_rate/category/") for key in rates if "/category/" in key
    ] == list(BEAVERTAILS.metric_keys())


# -- guarded generation (risk control) --------------------------------------------------------


@pytest.mark.slow
def test_guarded_generation_resamples_flagged_answers_then_refuses(moderation_run):
    from saferlhf.data.benchmark import generate_benchmark
    from saferlhf.moderation import Moderator
    from saferlhf.moderation.guard import guarded_generate

    _, run_dir = moderation_run
    moderator = Moderator.from_pretrained(run_dir / "artifacts" / "moderation")
    rows = generate_benchmark(
        num_train=10, num_test=400, seed=3, label_noise=0.0, benign_fraction=0.35
    )["test"]
    severe = next(
        (r["prompt"], r[f"response_{i}"])
        for r in rows
        for i in (0, 1)
        if r[f"response_{i}_severity_level"] == 3
    )
    safe = next(
        (r["prompt"], r[f"response_{i}"])
        for r in rows
        for i in (0, 1)
        if r[f"is_response_{i}_safe"]
    )
    prompt = severe[0]
    harmful = [r["prompt"] for r in rows if r["prompt"] != prompt and not r["is_response_0_safe"]]
    a, b, c = prompt, harmful[0], safe[0]
    # The sampler stands in for a policy: prompt a answers severely once, then safely;
    # b answers severely every time; c answers safely at once.
    script = {a: [severe[1], safe[1]], b: [severe[1]] * 3, c: [safe[1]]}
    calls = {key: 0 for key in script}

    def sample(batch):
        out = []
        for key in batch:
            out.append(script[key][calls[key]])
            calls[key] += 1
        return out

    assert moderator.moderate([prompt], [severe[1]])[0].severity >= 2  # the guard has work to do
    answers = guarded_generate(
        [a, b, c], sample, moderator, max_severity=1, retries=2, refusal="no ."
    )
    assert [(a.status, a.attempts) for a in answers] == [
        ("resampled", 2),
        ("refused", 3),
        ("accepted", 1),
    ]
    assert answers[1].response == "no ." and answers[0].response == safe[1]
    assert answers[1].severities[0] >= 2 and answers[2].severities[0] <= 1


@pytest.mark.slow
def test_generate_task_records_what_happened_to_each_prompt(moderation_run, compose_cfg, tmp_path):
    from saferlhf.cli import run
    from saferlhf.data.benchmark import generate_benchmark
    from saferlhf.data.collate import format_conversation
    from saferlhf.models import build_causal_lm, save_artifact, train_bpe_tokenizer

    _, run_dir = moderation_run
    rows = generate_benchmark(
        num_train=200, num_test=10, seed=0, label_noise=0.0, benign_fraction=0.35
    )["train"]
    tokenizer = train_bpe_tokenizer(
        [format_conversation(r["prompt"], r["response_0"]) for r in rows], 512, 2
    )
    cfg = compose_cfg("task=generate", "logger=none")
    save_artifact(build_causal_lm(cfg.model, tokenizer), tokenizer, tmp_path / "policy")
    cfg = compose_cfg(
        "task=generate",
        "logger=none",
        f"policy_path={tmp_path / 'policy'}",
        f"guard.moderation={run_dir / 'artifacts' / 'moderation'}",
        "guard.retries=1",
        "eval.num_prompts=20",
        "eval.sampling.max_new_tokens=8",
    )
    metrics = run(cfg, tmp_path / "run")
    records = [
        json.loads(line)
        for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
    ]
    assert len(records) == 20 and all(
        r["status"] in {"accepted", "resampled", "refused"} for r in records
    )
    assert all(1 <= r["attempts"] <= 2 and len(r["severities"]) == r["attempts"] for r in records)
    assert sum(
        metrics[f"generate/{s}_rate"]
        for s in ("accepted", "resampled", "refused")
        if f"generate/{s}_rate" in metrics
    ) == pytest.approx(1.0)
