"""``saferlhf task=generate policy_path=DIR [guard.moderation=DIR ...]``: answer a prompt set.

Without ``task.prompts_file`` the prompts are those task=evaluate judges (``eval.num_prompts``
of the test split, chosen by ``eval.seed``), sampled as it samples them (``eval.*``): unguarded,
a policy's answers are the ones task=evaluate scores for it.

With ``guard.moderation`` every response is moderated; one flagged above
``guard.max_severity`` is resampled up to ``guard.retries`` times, then replaced by
``guard.refusal``. ``generations.jsonl`` records each prompt's response, status (accepted,
resampled, refused), attempts, the moderator's severity per attempt and whether the moderator
saw a truncated conversation (still judged whole, the worst of several views). A prompt longer than
``model.max_length - eval.sampling.max_new_tokens`` keeps the template and its end;
``generate/truncated_prompts`` and ``generate/truncated_moderated`` count both kinds.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from saferlhf.data.collate import encode_prompts, log_truncated
from saferlhf.data.sources import load_data
from saferlhf.data.views import prompts as distinct_prompts
from saferlhf.evaluate.gold import fixed_eval_prompts, gold_metrics
from saferlhf.evaluate.policy import read_prompts_file, sample_and_score
from saferlhf.models import load_tokenizer
from saferlhf.moderation.guard import GuardedAnswer, guarded_generate
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import ConfigPathError


def _prompts(cfg) -> list[str]:
    if cfg.task.prompts_file:
        return read_prompts_file(cfg.task.prompts_file)
    test = distinct_prompts(load_data(cfg.data).splits["test"])
    return fixed_eval_prompts(test, cfg.eval.num_prompts, cfg.eval.seed)


def generate_task(run: RunContext) -> TaskResult:
    cfg, task, judged_as = run.cfg, run.cfg.task, run.cfg.eval
    if not cfg.policy_path or not Path(cfg.policy_path).is_dir():
        raise ConfigPathError(f"policy_path={cfg.policy_path!r}: expected a policy folder")
    if cfg.guard.moderation and not Path(cfg.guard.moderation).is_dir():
        raise ConfigPathError(
            f"guard.moderation={cfg.guard.moderation!r}: expected a moderation folder"
        )
    tokenizer = load_tokenizer(cfg.policy_path)
    policy = AutoModelForCausalLM.from_pretrained(cfg.policy_path).eval()
    prompts = _prompts(cfg)
    max_prompt = cfg.model.max_length - judged_as.sampling.max_new_tokens
    encoded = encode_prompts(tokenizer, prompts, max_prompt)
    log_truncated(encoded.num_truncated, len(prompts), "prompts", max_prompt)
    prompt_ids = dict(zip(prompts, encoded.examples, strict=True))
    moderator = None
    if cfg.guard.moderation:
        from saferlhf.moderation import Moderator

        moderator = Moderator.from_pretrained(cfg.guard.moderation)

    def sample(batch: list[str]) -> list[str]:
        ids = [prompt_ids[prompt] for prompt in batch]
        sampled = sample_and_score(
            policy, tokenizer, batch, ids, judged_as.sampling, None, judged_as.batch_size
        )
        return sampled.responses

    # Seeded right before the first draw, so that the first answers are task=evaluate's.
    torch.manual_seed(judged_as.seed)
    if moderator is not None:
        g = cfg.guard
        answers = guarded_generate(prompts, sample, moderator, g.max_severity, g.retries, g.refusal)
    else:
        answers = [
            GuardedAnswer(p, r, "unguarded", 1)
            for p, r in zip(prompts, sample(prompts), strict=True)
        ]

    path = run.run_dir / "generations.jsonl"
    with path.open("w") as f:
        for answer in answers:
            f.write(json.dumps(answer.record()) + "\n")
    statuses = Counter(a.status for a in answers)
    metrics = {f"generate/{status}_rate": n / len(answers) for status, n in statuses.items()}
    metrics["generate/mean_attempts"] = sum(a.attempts for a in answers) / len(answers)
    metrics["generate/truncated_prompts"] = encoded.num_truncated
    if cfg.guard.moderation:
        metrics["generate/truncated_moderated"] = sum(a.truncated for a in answers)
    if cfg.data.source == "benchmark" and not task.prompts_file:
        gold = gold_metrics([a.prompt for a in answers], [a.response for a in answers])
        metrics |= {f"generate/gold/{name}": value for name, value in gold.items()}
    run.log_metrics(metrics)
    return TaskResult(metrics, {"generations": str(path)})
