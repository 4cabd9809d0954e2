"""The policy's scores on fixed eval prompts, which PPO measures before and after training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from saferlhf.evaluate.gold import gold_metrics
from saferlhf.evaluate.policy import ScoreModel, sample_and_score


@dataclass
class FixedPromptEval:
    """Learned reward and cost (and gold metrics on the benchmark) of responses to the fixed
    eval prompts, sampled with ``sampling`` from ``seed`` without disturbing the training RNG."""

    prompts: list[str]  # each fixed prompt eval.responses_per_prompt times (judged_prompts)
    prompt_ids: list[list[int]]
    sampling: dict[str, Any]
    seed: int
    batch_size: int
    max_length: int  # of a scored prompt and response
    gold: bool

    def __call__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reward_model: PreTrainedModel,
        cost_model: PreTrainedModel | None,
    ) -> dict[str, float]:
        score_models = [
            ScoreModel(key, model, tokenizer, self.max_length)
            for key, model in (("reward", reward_model), ("cost", cost_model))
            if model is not None
        ]
        samples = sample_and_score(
            policy, tokenizer, self.prompts, self.prompt_ids, self.sampling, self.seed,
            self.batch_size, score_models,
        )  # fmt: skip
        # Means in float32, as the training history's are.
        metrics = {
            key: torch.tensor(scores).mean().item() for key, scores in samples.scores.items()
        }
        if self.gold:
            metrics |= {
                f"gold/{name}": value
                for name, value in gold_metrics(self.prompts, samples.responses).items()
            }
        return metrics
