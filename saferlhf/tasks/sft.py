"""``saferlhf task=sft``: supervised fine-tuning of a causal LM on (prompt, response).

Prompt tokens are masked from the loss, so the policy learns to answer, not to ask. The data
are the distinct (prompt, response) items of the train split: on PKU-SafeRLHF and the embedded
benchmark a mixture of safe and unsafe answers, as the Alpaca models the paper starts from.
A conversation longer than ``model.max_length`` loses the start of its prompt, never the
response it learns from (:func:`saferlhf.data.collate.keep_response_start`); ``train/truncated``
and ``val/truncated`` count them. Exports the best checkpoint (lowest ``val/loss``) as
``artifacts/policy``.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from saferlhf.data.collate import Encoded, encode_sft_examples, log_truncated
from saferlhf.data.module import LanguageModelingCollator, ListDataModule
from saferlhf.data.sources import load_data
from saferlhf.data.views import qa_items
from saferlhf.losses import selective_log_softmax
from saferlhf.models import build_causal_lm, lm_head_on
from saferlhf.models.sharding import shard_for_strategy
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import (
    adamw_with_schedule,
    export_artifact,
    fit_and_validate_best,
    model_config,
    pack_length,
    tokenizer_for,
)


def response_nll(
    model: PreTrainedModel, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the unmasked label tokens, and their count, from a
    :class:`~saferlhf.data.module.LanguageModelingCollator` batch, padded or packed.

    Only the positions that predict a label go through the LM head: prompts and padding are
    most of an SFT batch (about two thirds on the embedded benchmark), and their
    ``(tokens, V)`` logits would be thrown away. The numbers are the full logits' at those
    positions.
    """
    labels = batch["labels"][:, 1:]  # token t is predicted from tokens < t
    mask = (labels != -100) & (batch["weight"][:, None] > 0)
    predicting = F.pad(mask, (0, 1))  # (B, T): the last position predicts nothing
    with lm_head_on(model, predicting):
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),  # padded rows
            position_ids=batch.get("position_ids"),  # packed rows
            use_cache=False,
        ).logits  # (N, V)
    token_logps = selective_log_softmax(logits.float()[None], labels[mask][None])  # (1, N)
    return -token_logps.sum(), mask.sum()


class SFTModule(pl.LightningModule):
    def __init__(self, model: PreTrainedModel, lr: float, weight_decay: float, warmup_ratio: float):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model.train()  # from_pretrained returns eval mode: dropout would stay off
        self._val_nll = self._val_tokens = 0.0

    def configure_model(self) -> None:
        shard_for_strategy(self, [self.model])

    def training_step(self, batch, batch_idx):
        nll, tokens = response_nll(self.model, batch)
        loss = nll / tokens.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_nll = self._val_tokens = 0.0

    def validation_step(self, batch, batch_idx):
        nll, tokens = response_nll(self.model, batch)
        self._val_nll += nll
        self._val_tokens += tokens

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole split (and all ranks), not a mean of batch means.
        totals = self.trainer.strategy.reduce(
            torch.stack([self._val_nll, self._val_tokens.float()]), reduce_op="sum"
        )
        loss = totals[0] / totals[1]
        self.log_dict({"val/loss": loss, "val/perplexity": loss.exp()})

    def configure_optimizers(self):
        h = self.hparams
        steps_per_epoch = len(self.trainer.datamodule.train_dataloader())
        return adamw_with_schedule(
            self, self.model.parameters(), h.lr, h.weight_decay, h.warmup_ratio, steps_per_epoch
        )


def sft_examples(rows, tokenizer, max_length: int) -> Encoded[tuple[list[int], list[int]]]:
    items = qa_items(rows)
    return encode_sft_examples(
        tokenizer, [i.prompt for i in items], [i.response for i in items], max_length
    )


def sft_task(run: RunContext) -> TaskResult:
    cfg, task = run.cfg, run.cfg.task
    loaded = load_data(cfg.data)
    loaded.write_skipped(run.run_dir)
    model_cfg = model_config(cfg, "policy")
    tokenizer = tokenizer_for(model_cfg, loaded.splits["train"])
    model = build_causal_lm(model_cfg, tokenizer)
    max_length = cfg.model.max_length
    train = sft_examples(loaded.splits["train"], tokenizer, max_length)
    val = sft_examples(loaded.splits["test"], tokenizer, max_length)
    log_truncated(train.num_truncated, len(train.examples), "train conversations", max_length)
    log_truncated(val.num_truncated, len(val.examples), "validation conversations", max_length)

    module = SFTModule(model, task.lr, task.weight_decay, task.warmup_ratio)
    data = ListDataModule(
        train.examples,
        val.examples,
        LanguageModelingCollator(tokenizer.pad_token_id, pack_length(cfg.model)),
        task.batch_size,
        cfg.seed,
    )
    fit = fit_and_validate_best(run, module, data)
    metrics = fit.metrics | {
        "train/truncated": train.num_truncated,
        "val/truncated": val.num_truncated,
    }

    artifact = Path(run.run_dir) / "artifacts" / "policy"
    export_artifact(fit.trainer, module.model, tokenizer, artifact)
    return TaskResult(metrics, {"policy": str(artifact), "checkpoint": fit.best_checkpoint})
