"""``saferlhf task=ppo``: PPO (single preference) and PPO-Lagrangian (dual preference).

One LightningModule with manual optimisation holds the actor, a frozen reference, the frozen
reward model (and cost model), the reward critic (and cost critic) initialised from the score
models, and the Lagrange multiplier λ, whose rule is the config group ``lagrange``
(:mod:`saferlhf.rl.lagrange`: ``safe_rlhf`` learns λ, ``fixed`` holds it). Each training
step is one PPO iteration:

1. rollout: sample responses to a batch of prompts with the KV cache;
2. scoring: old log-probs, reference log-probs, values, reward and cost, under inference mode;
3. advantages: the reward and cost scores clamped to ±``algo.score_clip``, the reward of a
   response that never emitted EOS lowered by ``algo.missing_eos_penalty``; KL-shaped per-token
   reward and cost, GAE for each;
4. λ: the rule takes the iteration's episode costs and steps λ, here once or, with
   ``lagrange.update_per=minibatch``, before every minibatch of step 5 (dual only);
5. PPO epochs over minibatches: clipped surrogate on ``(A_r - λ·A_c) / (1 + λ)`` and clipped
   value losses for both critics, each averaged over tokens as ``algo.loss_aggregation`` says;
   the ptx (SFT) loss added to the actor loss (``algo.ptx_mode=joint``) or taken as a second
   actor step (``separate``). Each optimizer step also steps its network's learning-rate
   schedule (``algo.actor_lr_schedule``, ``algo.critic_lr_schedule``).

``summary.json`` names the run's ``variant``: the ``lagrange`` rule under preference=dual,
``single`` under preference=single. Maths lives in :mod:`saferlhf.losses`; see Safe RLHF
(arXiv 2310.12773) section 3.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy
from transformers import PreTrainedModel

from saferlhf.data import views
from saferlhf.data.collate import tokenize_prompts, tokenize_sft_examples
from saferlhf.data.module import LanguageModelingCollator
from saferlhf.data.sources import load_data
from saferlhf.errors import ConfigError
from saferlhf.evaluate.gold import fixed_eval_prompts, gold_metrics
from saferlhf.evaluate.policy import ScoreModel, sample_and_score
from saferlhf.losses import (
    clip_scores,
    combined_advantages,
    gae,
    kl_penalty,
    masked_mean,
    penalise_missing_eos,
    ppo_clip_loss,
    selective_log_softmax,
    shaped_costs,
    shaped_rewards,
    value_clip_loss,
)
from saferlhf.models import save_artifact
from saferlhf.rl.lagrange import Multiplier, multiplier_from_config
from saferlhf.rl.models import load_ppo_models
from saferlhf.rl.prompts import PromptDataModule
from saferlhf.rl.rollout import (
    Rollout,
    decode_responses,
    minibatch_rows,
    response_log_probs,
    response_logits,
    sample_responses,
    sequence_scores,
    token_values,
)
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import (
    cosine_with_warmup,
    required_artifact,
    resolve_ckpt_path,
    stop_if_non_finite,
)
from saferlhf.tasks.sft import response_nll


def ended_responses(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(B,)`` True where a ``(B, R)`` response holds EOS: it ended before ``max_new_tokens``
    ran out. Decoding pads only after an EOS, so a pad token equal to EOS changes nothing."""
    return (responses == eos_token_id).any(-1)


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.requires_grad_(False)
    return model.eval()


class PPOModule(pl.LightningModule):
    def __init__(
        self,
        actor: PreTrainedModel,
        reference: PreTrainedModel | None,
        reward_model: PreTrainedModel,
        reward_critic: PreTrainedModel,
        cost_model: PreTrainedModel | None,
        cost_critic: PreTrainedModel | None,
        lagrange: Multiplier | None,
        tokenizer,
        algo,
        eval_prompts: Sequence[str],
        eval_prompt_ids: Sequence[Sequence[int]],
        eval_cfg,
        max_length: int,
        gold: bool,
        ptx_examples: Sequence | None = None,
        sample_every: int = 0,
        static_prompt_width: int | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        # Without a reference model the actor is a LoRA model whose base is the reference.
        self.actor = actor.train()
        self.reference = _frozen(reference) if reference is not None else None
        self.reward_model, self.reward_critic = _frozen(reward_model), reward_critic.train()
        self.cost_model = _frozen(cost_model) if cost_model is not None else None
        self.cost_critic = cost_critic.train() if cost_critic is not None else None
        self.lagrange = lagrange
        self.tokenizer, self.algo = tokenizer, algo
        self.eval_prompts, self.eval_prompt_ids = list(eval_prompts), list(eval_prompt_ids)
        self.eval_cfg, self.max_length = eval_cfg, max_length
        self.gold, self.sample_every = gold, sample_every
        self.sampling = dict(
            eval_cfg.sampling,
            static_prompt_width=static_prompt_width,
            compile_decoding=static_prompt_width is not None,
        )
        self.ptx_examples = ptx_examples
        self.ptx_collate = LanguageModelingCollator(tokenizer.pad_token_id)
        self.history: list[dict[str, float]] = []
        self.initial_eval: dict[str, float] | None = None
        self._resume_rng_state: tuple | None = None  # (CPU state, CUDA states or None)
        self.final_eval: dict[str, float] | None = None
        self.optimizer_names: list[str] = []  # set by configure_optimizers, in its order
        # λ moves by its own rule on every rank alike; DDP must not average its gradient.
        self._ddp_params_and_buffers_to_ignore = ["lagrange.log_lambda"]

    @property
    def constrained(self) -> bool:
        return self.lagrange is not None

    @property
    def ptx_separate(self) -> bool:
        return self.algo.ptx_coef > 0 and self.algo.ptx_mode == "separate"

    # -- optimisers ---------------------------------------------------------------------------

    def configure_optimizers(self):
        """AdamW and a learning-rate schedule for each trained network, then λ's optimizer
        (if its rule has one). ``optimizer_names`` keeps the order, which the schedules share."""
        a = self.algo
        updates = a.iterations * a.ppo_epochs * math.ceil(a.rollout_batch_size / a.minibatch_size)
        actor_steps = 2 * updates if self.ptx_separate else updates
        networks = {  # name: (model, learning rate, schedule, optimizer steps in the whole run)
            "actor": (self.actor, a.actor_lr, a.actor_lr_schedule, actor_steps),
            "reward_critic": (self.reward_critic, a.critic_lr, a.critic_lr_schedule, updates),
        }
        if self.cost_critic is not None:
            networks["cost_critic"] = (self.cost_critic, a.critic_lr, a.critic_lr_schedule, updates)
        optimizers, schedules = {}, []
        for name, (model, lr, schedule, steps) in networks.items():
            trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: adapters
            optimizers[name] = torch.optim.AdamW(
                trainable,
                lr=lr,
                betas=tuple(a.adam_betas),
                weight_decay=a.weight_decay,
                fused=True,
            )
            schedules.append(
                torch.optim.lr_scheduler.LambdaLR(
                    optimizers[name], lr_multiplier(schedule, steps, a.warmup_ratio)
                )
            )
        lambda_optimizer = self.lagrange.make_optimizer() if self.lagrange is not None else None
        if lambda_optimizer is not None:
            optimizers["lambda"] = lambda_optimizer
        self.optimizer_names = list(optimizers)
        return list(optimizers.values()), schedules

    def _optimizer(self, name: str):
        return self.optimizers()[self.optimizer_names.index(name)]

    def _update(self, network: str, loss: torch.Tensor) -> None:
        """One optimizer step of ``network`` on ``loss`` (gradient norm clipped), then one step
        of its learning-rate schedule."""
        optimizer = self._optimizer(network)
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(
            optimizer, gradient_clip_val=self.algo.grad_clip, gradient_clip_algorithm="norm"
        )
        optimizer.step()
        self.lr_schedulers()[self.optimizer_names.index(network)].step()

    def _step_lambda(self, when: str, episode_cost: float | None) -> None:
        """Let the λ rule step if it steps ``when`` (``iteration`` or ``minibatch``)."""
        if self.constrained and self.lagrange.update_per == when:
            optimizer = self._optimizer("lambda") if "lambda" in self.optimizer_names else None
            self.lagrange.step(optimizer, episode_cost)

    # -- one PPO iteration --------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        a = self.algo

        # 1. rollout
        started = self._clock()
        rollout = sample_responses(self.actor, self.tokenizer, batch["prompt_ids"], **self.sampling)
        rollout = rollout.trimmed()  # the compiled decoding's fixed prompt width is padding
        generated = self._clock()

        # 2. scoring, all without autograd
        scores = self._score(rollout)
        old_logprobs, reward, old_reward_values = (
            scores["logprobs"],
            scores["reward"],
            scores["reward_values"],
        )
        cost, old_cost_values = scores.get("cost"), scores.get("cost_values")
        scored = self._clock()

        # 3. advantages: KL-shaped per-token reward (and cost), GAE for each
        mask = rollout.response_mask
        ended = ended_responses(rollout.responses, self.tokenizer.eos_token_id)
        kl = kl_penalty(old_logprobs, scores["ref_logprobs"]) * mask
        reward_score = penalise_missing_eos(
            clip_scores(reward, a.score_clip), ended, a.missing_eos_penalty
        )
        reward_advantages, reward_returns = gae(
            shaped_rewards(reward_score, kl, mask, a.kl_coef),
            old_reward_values,
            mask,
            a.gamma,
            a.gae_lambda,
        )
        metrics: dict[str, float] = {}
        episode_cost = None
        if self.constrained:
            cost_advantages, cost_returns = gae(
                shaped_costs(clip_scores(cost, a.score_clip), kl, mask, a.kl_coef),
                old_cost_values,
                mask,
                a.gamma,
                a.gae_lambda,
            )
            # 4. λ from the recent mean episode cost (once here, or before every minibatch)
            episode_cost = self.lagrange.record(cost)
            metrics["rollout/episode_cost"] = episode_cost
            self._step_lambda("iteration", episode_cost)

        # 5. PPO epochs over minibatches, each trimmed to its own longest prompt and response
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(a.ppo_epochs):
            for rows in minibatch_rows(
                rollout.attention_mask.sum(-1), a.minibatch_size, a.length_bucketing
            ):
                self._step_lambda("minibatch", episode_cost)
                mb = rollout.select(rows).trimmed()
                mb_mask = mb.response_mask
                cells = (rows, slice(None, mb_mask.shape[1]))  # per-token tensors, trimmed alike
                advantages = reward_advantages[cells]
                if self.constrained:
                    advantages = combined_advantages(
                        advantages, cost_advantages[cells], self.lagrange.value
                    )
                logprobs = selective_log_softmax(
                    response_logits(self.actor, mb).float(), mb.responses
                )
                clip = ppo_clip_loss(
                    logprobs,
                    old_logprobs[cells],
                    advantages,
                    mb_mask,
                    a.clip_range,
                    aggregation=a.loss_aggregation,
                )
                step = {
                    "train/actor_loss": clip.loss.item(),
                    "train/clip_fraction": clip.clip_fraction.item(),
                    "train/approx_kl": clip.approx_kl.item(),
                }
                actor_loss = clip.loss
                if a.ptx_coef > 0 and a.ptx_mode == "joint":
                    ptx_loss = self._ptx_loss()
                    step["train/ptx_loss"] = ptx_loss.item()
                    actor_loss = actor_loss + a.ptx_coef * ptx_loss
                self._update("actor", actor_loss)
                if self.ptx_separate:  # a second step, on the SFT loss at the updated weights
                    ptx_loss = self._ptx_loss()
                    step["train/ptx_loss"] = ptx_loss.item()
                    self._update("actor", a.ptx_coef * ptx_loss)

                reward_value = value_clip_loss(
                    token_values(self.reward_critic, mb),
                    old_reward_values[cells],
                    reward_returns[cells],
                    mb_mask,
                    a.value_clip_range,
                    aggregation=a.loss_aggregation,
                )
                self._update("reward_critic", reward_value.loss)
                step["train/reward_value_loss"] = reward_value.loss.item()
                if self.constrained:
                    cost_value = value_clip_loss(
                        token_values(self.cost_critic, mb),
                        old_cost_values[cells],
                        cost_returns[cells],
                        mb_mask,
                        a.value_clip_range,
                        aggregation=a.loss_aggregation,
                    )
                    self._update("cost_critic", cost_value.loss)
                    step["train/cost_value_loss"] = cost_value.loss.item()
                for name, value in step.items():  # averaged over every minibatch, not the last
                    sums[name] = sums.get(name, 0.0) + value
                updates += 1
        updated = self._clock()

        if self.constrained:
            metrics["lagrange/lambda"] = self.lagrange.value
            if self.trainer.world_size > 1:  # λ must be identical on every rank
                lambdas = self.all_gather(torch.tensor(self.lagrange.value, device=self.device))
                metrics["lagrange/lambda_rank_spread"] = (lambdas.max() - lambdas.min()).item()
        metrics |= {name: total / updates for name, total in sums.items()}
        metrics |= {
            "iteration": float(batch_idx + 1),
            "rollout/reward": reward.mean().item(),
            "rollout/kl": (kl.sum(-1)).mean().item(),
            "rollout/entropy": masked_mean(rollout.entropy, mask).item(),
            "rollout/response_length": mask.sum(-1).mean().item(),
            "rollout/ended_rate": ended.float().mean().item(),
            "time/generation": generated - started,
            "time/scoring": scored - generated,
            "time/update": updated - scored,
        }
        if cost is not None:
            metrics["rollout/cost"] = cost.mean().item()
            metrics["rollout/unsafe_rate"] = (cost > 0).float().mean().item()
        networks = (self.actor, self.reward_critic, self.cost_critic)
        stop_if_non_finite(self.trainer, f"PPO iteration {batch_idx + 1}", metrics, networks)
        responses = decode_responses(self.tokenizer, rollout)
        if self.gold:
            metrics |= {
                f"gold/{k}": v for k, v in gold_metrics(batch["prompts"], responses).items()
            }
        self.history.append(metrics)
        self.log_dict(metrics, on_step=True, prog_bar=False)
        self._log_samples(batch_idx, batch["prompts"], responses, reward, cost)

    def _clock(self) -> float:
        """Wall time once the GPU has run what is queued, so each phase is timed by its own
        work (CUDA calls return before their kernels finish)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _score(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Everything the update compares against, computed once under inference mode."""
        with torch.inference_mode():
            scores = {
                "logprobs": rollout.logprobs,  # kept while sampling: no actor pass needed
                "ref_logprobs": self._reference_log_probs(rollout),
                "reward": sequence_scores(self.reward_model, rollout),
                "reward_values": token_values(self.reward_critic, rollout),
            }
            if self.cost_model is not None:
                scores["cost"] = sequence_scores(self.cost_model, rollout)
            if self.cost_critic is not None:
                scores["cost_values"] = token_values(self.cost_critic, rollout)
        # Inference tensors cannot enter autograd graphs; plain copies can.
        return {name: value.clone() for name, value in scores.items()}

    def _reference_log_probs(self, rollout: Rollout) -> torch.Tensor:
        if self.reference is not None:
            return response_log_probs(self.reference, rollout)
        with self.actor.disable_adapter():  # LoRA: the base model is the reference
            return response_log_probs(self.actor, rollout)

    def _ptx_loss(self) -> torch.Tensor:
        picks = torch.randint(len(self.ptx_examples), (self.algo.ptx_batch_size,)).tolist()
        batch = self.ptx_collate([(self.ptx_examples[i], 1.0) for i in picks])
        nll, tokens = response_nll(self.actor, {k: v.to(self.device) for k, v in batch.items()})
        return nll / tokens.clamp(min=1)

    def _log_samples(self, batch_idx: int, prompts, responses, reward, cost) -> None:
        if (
            not self.sample_every
            or (batch_idx + 1) % self.sample_every
            or not isinstance(self.logger, WandbLogger)
        ):
            return
        rows = [
            [
                batch_idx + 1,
                p,
                r,
                reward[i].item(),
                cost[i].item() if cost is not None else math.nan,
            ]
            for i, (p, r) in enumerate(zip(prompts[:8], responses[:8], strict=True))
        ]
        self.logger.log_table(
            key="samples", columns=["iteration", "prompt", "response", "reward", "cost"], data=rows
        )

    # -- the fixed-prompt gold evaluation before and after training ---------------------------

    def evaluate_fixed_prompts(self) -> dict[str, float]:
        """Learned reward and cost (and gold metrics on the benchmark) of responses to the
        fixed eval prompts, sampled as ``eval`` says without disturbing the training RNG."""
        score_models = [
            ScoreModel(key, model, self.tokenizer, self.max_length)
            for key, model in (("reward", self.reward_model), ("cost", self.cost_model))
            if model is not None
        ]
        samples = sample_and_score(
            self.actor, self.tokenizer, self.eval_prompts, self.eval_prompt_ids, self.sampling,
            self.eval_cfg.seed, self.eval_cfg.batch_size, score_models,
        )  # fmt: skip
        # Means in float32, as the training history's are.
        metrics = {
            key: torch.tensor(scores).mean().item() for key, scores in samples.scores.items()
        }
        if self.gold:
            metrics |= {
                f"gold/{name}": value
                for name, value in gold_metrics(self.eval_prompts, samples.responses).items()
            }
        return metrics

    def on_train_start(self) -> None:
        if self.initial_eval is None:  # a resumed run keeps the one it measured before training
            self.initial_eval = self.evaluate_fixed_prompts()

    def on_train_end(self) -> None:
        self.final_eval = self.evaluate_fixed_prompts()

    # -- exact resume: RNG, history and the initial evaluation travel in the checkpoint -------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ppo"] = {
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "history": self.history,
            "initial_eval": self.initial_eval,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["ppo"]
        self.history, self.initial_eval = state["history"], state["initial_eval"]
        # Applied right before the next iteration: the Trainer draws random numbers while it
        # sets up, after loading the checkpoint.
        self._resume_rng_state = state["rng"], state.get("cuda_rng")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._resume_rng_state is not None:
            cpu_state, cuda_states = self._resume_rng_state
            torch.set_rng_state(cpu_state)
            if cuda_states is not None:  # decoding and minibatch order draw on the GPU's RNG
                torch.cuda.set_rng_state_all(cuda_states)
            self._resume_rng_state = None


class IterationCheckpoint(Callback):
    """Refresh ``checkpoints/last.ckpt`` every N PPO iterations (``global_step`` counts every
    optimizer step under manual optimisation, so it cannot be used for this)."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.every == 0:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state, to resume


def decodes_compiled(algo, trainer_cfg) -> bool:
    """``algo.compile_generation``, or when unset: on CUDA, in one process or under DDP.

    Compiled decoding pays off where kernel launches dominate a decoding step, on GPUs; sharded
    parameters (fsdp, deepspeed) inside its CUDA graphs are untested, so those opt in."""
    if algo.compile_generation is not None:
        return algo.compile_generation
    return trainer_cfg.accelerator in ("gpu", "cuda") and trainer_cfg.strategy in ("auto", "ddp")


def lr_multiplier(schedule: str, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step of a network that takes
    ``total_steps``: 1 throughout (``constant``), or a linear warm-up over
    ``int(warmup_ratio · total_steps)`` steps, then a cosine decay to 0 (``cosine``)."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        warmup_steps = int(warmup_ratio * total_steps)
        return lambda step: cosine_with_warmup(step, warmup_steps, total_steps)
    raise ValueError(f"learning-rate schedule {schedule!r}: expected constant or cosine")


def check_ppo_config(cfg) -> None:
    """Fail before anything loads, naming the key, on what validate_config's per-value ranges
    cannot see: the length of algo.adam_betas, a λ rule the preference has no cost model for."""
    if len(cfg.algo.adam_betas) != 2:
        raise ConfigError(
            f"algo.adam_betas={list(cfg.algo.adam_betas)}: expected two values [β1, β2]"
        )
    if cfg.lagrange.name == "fixed" and not cfg.preference.use_cost:
        raise ConfigError(
            f"lagrange=fixed needs a cost model, which preference={cfg.preference.name} has "
            "not: use preference=dual"
        )


def ppo_variant(cfg) -> str:
    """The run's ``variant`` in ``summary.json``: the λ rule under preference=dual (``safe_rlhf``,
    ``fixed``), else the preference (``single``)."""
    return str(cfg.lagrange.name) if cfg.preference.use_cost else str(cfg.preference.name)


def ppo_task(run: RunContext) -> TaskResult:
    cfg, algo = run.cfg, run.cfg.algo
    check_ppo_config(cfg)
    uses_cost = cfg.preference.use_cost
    policy_dir = required_artifact(cfg, "policy")
    reward_dir = required_artifact(cfg, "reward")
    cost_dir = required_artifact(cfg, "cost") if uses_cost else None

    models = load_ppo_models(policy_dir, reward_dir, cost_dir, algo)
    tokenizer = models.tokenizer
    lagrange = multiplier_from_config(cfg.lagrange) if uses_cost else None

    loaded = load_data(cfg.data)
    loaded.write_skipped(run.run_dir)
    max_prompt = cfg.model.max_length - cfg.eval.sampling.max_new_tokens
    train_prompts = views.prompts(loaded.splits["train"])
    test_prompts = views.prompts(loaded.splits["test"])
    eval_prompts = fixed_eval_prompts(test_prompts, cfg.eval.num_prompts, cfg.eval.seed)
    ptx = None
    if algo.ptx_coef > 0:
        pairs = views.conversations(loaded.splits["train"])  # single-preference rows too
        ptx = tokenize_sft_examples(
            tokenizer, [p for p, _ in pairs], [r for _, r in pairs], cfg.model.max_length
        )

    module = PPOModule(
        models.actor,
        models.reference,
        models.reward_model,
        models.reward_critic,
        models.cost_model,
        models.cost_critic,
        lagrange,
        tokenizer,
        algo,
        eval_prompts=eval_prompts,
        eval_prompt_ids=tokenize_prompts(tokenizer, eval_prompts, max_prompt),
        eval_cfg=cfg.eval,
        max_length=cfg.model.max_length,
        gold=cfg.data.source == "benchmark",
        ptx_examples=ptx,
        sample_every=cfg.task.sample_every,
        static_prompt_width=max_prompt if decodes_compiled(algo, cfg.trainer) else None,
    )
    data = PromptDataModule(
        train_prompts, tokenize_prompts(tokenizer, train_prompts, max_prompt), algo.iterations,
        algo.rollout_batch_size, cfg.seed,
    )  # fmt: skip
    trainer_cfg = {k: v for k, v in cfg.trainer.items() if k != "log_every_n_steps"}
    if trainer_cfg["strategy"] == "ddp":
        # Each network has its own backward pass, so every backward leaves the others unused.
        trainer_cfg["strategy"] = DDPStrategy(find_unused_parameters=True)
    checkpoint_path = run.run_dir / "checkpoints" / "last.ckpt"
    trainer = pl.Trainer(
        **trainer_cfg,
        max_epochs=1,
        default_root_dir=run.run_dir,
        logger=run.logger if run.logger is not None else False,
        callbacks=[IterationCheckpoint(checkpoint_path, cfg.task.checkpoint_every), *run.callbacks],
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # one step is a whole PPO iteration
    )
    trainer.fit(module, datamodule=data, ckpt_path=resolve_ckpt_path(cfg, run.run_dir))

    artifact = run.run_dir / "artifacts" / "policy"
    metrics = dict(module.history[-1])
    metrics |= {f"initial/{name}": value for name, value in module.initial_eval.items()}
    metrics |= {f"final/{name}": value for name, value in module.final_eval.items()}
    if trainer.is_global_zero:
        policy = module.actor.merge_and_unload() if algo.lora_rank > 0 else module.actor
        save_artifact(policy, tokenizer, artifact)  # a plain causal LM either way
        (run.run_dir / "ppo_history.json").write_text(json.dumps(module.history, indent=1) + "\n")
    return TaskResult(
        metrics,
        {"policy": str(artifact), "history": str(run.run_dir / "ppo_history.json")},
        variant=ppo_variant(cfg),
    )
