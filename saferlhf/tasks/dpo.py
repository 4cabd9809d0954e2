"""``saferlhf task=dpo``: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290).

The policy starts from ``init.policy`` (an SFT artifact) and a frozen copy of it is the
reference. Per batch: the summed log-probabilities of the chosen and the rejected response
(prompt tokens masked) under both models, then :func:`saferlhf.losses.dpo_loss` with
``β = task.beta``. Each epoch validates on the test split's pairs: ``val/loss``,
``val/reward_margin`` (mean implied reward margin ``β[(log π - log π_ref)(y_w) -
(log π - log π_ref)(y_l)]``) and ``val/reward_accuracy`` (share of pairs whose margin is > 0;
exactly 0 before training, where policy = reference). The best checkpoint by ``task.monitor``
is exported as ``artifacts/policy``.

Which pairs:

- ``preference=single``: ordered by ``better_response_id`` (on single-dimension rows the one
  label that trades helpfulness against harmlessness).
- ``preference=dual``: one pair per row from both labels, by the rule named in
  ``task.dual_rule`` (:data:`DUAL_RULES`); the loss is the same standard DPO loss.
  ``safety_first`` (:func:`safety_first_pairs`), harmlessness before helpfulness as Safe
  RLHF's constraint would demand:

  ====================  ===========================
  responses             chosen
  ====================  ===========================
  one safe, one unsafe  the safe one
  both safe             ``better_response_id``
  both unsafe           ``safer_response_id``
  ====================  ===========================

On the embedded benchmark the exported policy and the SFT policy it started from are both
judged by the oracle on the fixed test prompts, sampled as ``eval`` says (as task=ppo and
task=evaluate judge theirs): ``final/gold/<name>`` and ``initial/gold/<name>``
(:func:`saferlhf.evaluate.gold.gold_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from saferlhf.data import schema, views
from saferlhf.data.collate import tokenize_prompts, tokenize_sft_examples
from saferlhf.data.module import LanguageModelingCollator, ListDataModule
from saferlhf.data.sources import load_data
from saferlhf.errors import ConfigError
from saferlhf.evaluate.gold import gold_metrics, judged_prompts
from saferlhf.evaluate.policy import sample_and_score
from saferlhf.losses import dpo_loss, sequence_log_probs
from saferlhf.models import load_tokenizer
from saferlhf.models.sharding import is_sharded, shard_for_strategy, unsharded_copy
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import (
    adamw_with_schedule,
    export_artifact,
    fit_and_validate_best,
    gather_across_ranks,
    required_artifact,
)

# -- which pairs: preference=dual rules, (rows) -> pairs ----------------------------------------


def _pair(row, chosen: int) -> views.PreferencePair:
    return views.PreferencePair(
        row["prompt"], row[f"response_{chosen}"], row[f"response_{1 - chosen}"]
    )


def safety_first_pairs(rows: views.Rows) -> list[views.PreferencePair]:
    """One pair per row: a safe response beats an unsafe one; otherwise the more helpful one
    (``better_response_id``) wins when both are safe and the safer one (``safer_response_id``)
    when both are unsafe."""
    pairs = []
    for row in rows:
        safe = (row["is_response_0_safe"], row["is_response_1_safe"])
        if safe[0] != safe[1]:
            chosen = safe.index(True)
        elif safe[0]:
            chosen = row["better_response_id"]
        else:
            chosen = row["safer_response_id"]
        pairs.append(_pair(row, chosen))
    return pairs


DUAL_RULES: dict[str, Callable[[views.Rows], list[views.PreferencePair]]] = {
    "safety_first": safety_first_pairs,
}


def dual_preference_pairs(rows: views.Rows, rule: str) -> list[views.PreferencePair]:
    """Dual-preference rows ordered into one pair each by the rule ``task.dual_rule`` names."""
    return dual_rule(rule)(rows)


def dual_rule(rule: str) -> Callable[[views.Rows], list[views.PreferencePair]]:
    if rule not in DUAL_RULES:
        raise ConfigError(f"task.dual_rule={rule!r}: expected one of {sorted(DUAL_RULES)}")
    return DUAL_RULES[rule]


def training_pairs(cfg: DictConfig, rows: views.Rows) -> list[views.PreferencePair]:
    """The pairs DPO learns from for ``cfg.preference`` (see the module docstring)."""
    if cfg.preference.use_cost:
        return dual_preference_pairs(rows, cfg.task.dual_rule)
    return views.preference_pairs(rows)


# -- tokens and batches -------------------------------------------------------------------------

Example = tuple[list[int], list[int]]  # (input_ids, labels), labels -100 on the prompt


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[views.PreferencePair], max_length: int
) -> list[tuple[Example, Example]]:
    """``(chosen, rejected)`` examples per pair, each with its prompt masked from the labels."""
    prompts = [p.prompt for p in pairs]
    chosen = tokenize_sft_examples(tokenizer, prompts, [p.chosen for p in pairs], max_length)
    rejected = tokenize_sft_examples(tokenizer, prompts, [p.rejected for p in pairs], max_length)
    return list(zip(chosen, rejected, strict=True))


class PreferenceCollator:
    """Stacks B pairs as 2B right-padded sequences: the B chosen, then the B rejected."""

    def __init__(self, pad_token_id: int):
        self.collate = LanguageModelingCollator(pad_token_id)

    def __call__(self, items: Sequence[tuple]) -> dict[str, torch.Tensor]:
        chosen = [(c, weight) for (c, _), weight in items]
        rejected = [(r, weight) for (_, r), weight in items]
        batch = self.collate(chosen + rejected)  # input_ids, attention_mask, labels: (2B, T)
        batch["weight"] = batch["weight"][: len(items)]  # (B,), 0 on ShardedSampler padding
        return batch


def response_log_likelihood(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``log π(y|x)`` per sequence: the summed log-probs of the unmasked label tokens, ``(N,)``."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    labels = batch["labels"][:, 1:]  # token t is predicted from tokens < t
    return sequence_log_probs(logits[:, :-1].float(), labels, labels != -100)


# -- the module ---------------------------------------------------------------------------------


class DPOModule(pl.LightningModule):
    def __init__(
        self,
        policy: PreTrainedModel,
        reference: PreTrainedModel,
        beta: float,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "reference"])
        self.policy = policy.train()  # from_pretrained returns eval mode
        self.reference = reference.requires_grad_(False).eval()
        self._val_batches: list[dict[str, torch.Tensor]] = []

    def configure_model(self) -> None:
        shard_for_strategy(self, [self.policy], [self.reference])

    def train(self, mode: bool = True) -> DPOModule:
        super().train(mode)
        self.reference.eval()  # frozen: never in training mode (dropout), whatever the loop asks
        return self

    def _log_probs(self, batch) -> torch.Tensor:
        """``(B, 4)``: policy chosen, policy rejected, reference chosen, reference rejected."""
        policy = response_log_likelihood(self.policy, batch)  # (2B,)
        with torch.no_grad():
            reference = response_log_likelihood(self.reference, batch)  # (2B,)
        return torch.stack([*policy.chunk(2), *reference.chunk(2)], dim=1)

    def training_step(self, batch, batch_idx):
        logps = self._log_probs(batch)
        real = batch["weight"] > 0  # ShardedSampler's padding slots carry weight 0
        if not real.any():
            return logps.sum() * 0.0  # keep every rank's backward in step under DDP
        out = dpo_loss(*logps[real].unbind(dim=1), beta=self.hparams.beta)
        margin = out.chosen_rewards - out.rejected_rewards
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict(
            {
                "train/reward_margin": margin.mean(),
                "train/reward_accuracy": (margin > 0).float().mean(),
            }
        )
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._val_batches = []

    def validation_step(self, batch, batch_idx):
        self._val_batches.append({"logps": self._log_probs(batch), "weight": batch["weight"]})

    def _gathered(self, key: str) -> torch.Tensor:
        return gather_across_ranks(self, self._val_batches, key)

    def on_validation_epoch_end(self) -> None:
        logps = self._gathered("logps")[self._gathered("weight") > 0]  # (num_pairs, 4)
        out = dpo_loss(*logps.unbind(dim=1), beta=self.hparams.beta)
        margin = out.chosen_rewards - out.rejected_rewards
        # Every rank holds the same gathered values: the sync averages identical numbers.
        self.log_dict(
            {
                "val/loss": out.loss,
                "val/reward_accuracy": (margin > 0).float().mean(),
                "val/reward_margin": margin.mean(),
            },
            sync_dist=True,
        )

    # The reference never changes and is reloaded from init.policy: keep it out of checkpoints,
    # but for sharded ones, which load in place and need every key the module has.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if is_sharded(self.reference):
            return
        state = checkpoint["state_dict"]
        for name in [k for k in state if k.startswith("reference.")]:
            del state[name]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if is_sharded(self.reference):
            return
        checkpoint["state_dict"].update(
            {f"reference.{k}": v for k, v in self.reference.state_dict().items()}
        )

    def configure_optimizers(self):
        h = self.hparams
        steps_per_epoch = len(self.trainer.datamodule.train_dataloader())
        return adamw_with_schedule(
            self, self.policy.parameters(), h.lr, h.weight_decay, h.warmup_ratio, steps_per_epoch
        )


# -- the fixed-prompt gold evaluation -----------------------------------------------------------


def fixed_prompt_gold(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_length: int,
    eval_cfg: DictConfig,
) -> dict[str, float]:
    """Gold metrics of one response per item of ``prompts`` (the eval node's
    :func:`~saferlhf.evaluate.gold.judged_prompts`), sampled as ``eval_cfg`` says; the caller's
    RNG state is left untouched."""
    max_prompt = max_length - eval_cfg.sampling.max_new_tokens
    samples = sample_and_score(
        policy.eval(), tokenizer, prompts, tokenize_prompts(tokenizer, prompts, max_prompt),
        eval_cfg.sampling, eval_cfg.seed, eval_cfg.batch_size,
    )  # fmt: skip
    return gold_metrics(prompts, samples.responses)


# -- the task -----------------------------------------------------------------------------------


def _check_rows(cfg: DictConfig, kind: str) -> None:
    needed = (schema.PREFERENCE,) if cfg.preference.use_cost else (schema.PREFERENCE, schema.SINGLE)
    if kind not in needed:
        raise ConfigError(
            f"task=dpo preference={cfg.preference.name} cannot learn from data.kind={kind} rows "
            f"(needs {' or '.join(needed)})"
        )


def dpo_task(run: RunContext) -> TaskResult:
    cfg, task = run.cfg, run.cfg.task
    policy_dir = required_artifact(cfg, "policy")
    if cfg.preference.use_cost:
        dual_rule(task.dual_rule)  # a typo fails before any loading or training
    loaded = load_data(cfg.data)
    _check_rows(cfg, loaded.kind)
    loaded.write_skipped(run.run_dir)

    tokenizer = load_tokenizer(policy_dir, cfg.model.trust_remote_code)
    remote = cfg.model.trust_remote_code
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, trust_remote_code=remote)
    reference = AutoModelForCausalLM.from_pretrained(policy_dir, trust_remote_code=remote)
    max_length = cfg.model.max_length
    train = tokenize_pairs(tokenizer, training_pairs(cfg, loaded.splits["train"]), max_length)
    val = tokenize_pairs(tokenizer, training_pairs(cfg, loaded.splits["test"]), max_length)

    module = DPOModule(policy, reference, task.beta, task.lr, task.weight_decay, task.warmup_ratio)
    data = ListDataModule(
        train, val, PreferenceCollator(tokenizer.pad_token_id), task.batch_size, cfg.seed
    )
    fit = fit_and_validate_best(run, module, data)
    metrics = fit.metrics

    artifact = Path(run.run_dir) / "artifacts" / "policy"
    policy = export_artifact(fit.trainer, module.policy, tokenizer, artifact)
    reference = unsharded_copy(module.reference, fit.trainer.is_global_zero)
    if fit.trainer.is_global_zero and cfg.data.source == "benchmark":
        test_prompts = views.prompts(loaded.splits["test"])
        prompts = judged_prompts(test_prompts, cfg.eval)
        device = fit.trainer.strategy.root_device
        for stage, model in (("initial", reference), ("final", policy)):
            gold = fixed_prompt_gold(model.to(device), tokenizer, prompts, max_length, cfg.eval)
            metrics |= {f"{stage}/gold/{name}": value for name, value in gold.items()}
        run.log_metrics({k: v for k, v in metrics.items() if "/gold/" in k})
    return TaskResult(metrics, {"policy": str(artifact), "checkpoint": fit.best_checkpoint})
