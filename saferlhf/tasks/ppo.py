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
``single`` under preference=single. Steps 2 and 3 live in :mod:`saferlhf.rl.experience`, step 5's
minibatch in :mod:`saferlhf.rl.update`, the maths in :mod:`saferlhf.losses`; see Safe RLHF
(arXiv 2310.12773) section 3.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from transformers import PreTrainedModel

from saferlhf.config import CostLimitOrigin, PtxData
from saferlhf.data import views
from saferlhf.data.collate import (
    tokenize_conversations,
    tokenize_prompts,
    tokenize_sft_examples,
)
from saferlhf.data.sources import load_data
from saferlhf.errors import ConfigError
from saferlhf.evaluate.gold import gold_metrics, judged_prompts
from saferlhf.models.sharding import shard_for_strategy
from saferlhf.rl.checkpoint import IterationCheckpoint
from saferlhf.rl.config import check_ppo_config, decodes_compiled, ppo_variant
from saferlhf.rl.experience import make_experience, rollout_metrics, score_rollout
from saferlhf.rl.fixed_eval import FixedPromptEval
from saferlhf.rl.lagrange import (
    SAFE_RESPONSES_SCORED,
    Multiplier,
    mean_cost,
    multiplier_from_config,
)
from saferlhf.rl.models import PPOModels, load_ppo_models
from saferlhf.rl.prompts import PromptDataModule
from saferlhf.rl.rollout import decode_responses, minibatch_rows, sample_responses
from saferlhf.rl.update import (
    PtxLoss,
    make_optimizers,
    select_minibatch,
    update_actor,
    update_critics,
)
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import (
    export_artifact,
    pack_length,
    required_artifact,
    resolve_ckpt_path,
    stop_if_non_finite,
    trainer_arguments,
)


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.requires_grad_(False)
    return model.eval()


class PPOModule(pl.LightningModule):
    def __init__(
        self,
        models: PPOModels,
        lagrange: Multiplier | None,
        algo,
        sampling: dict[str, Any],
        fixed_eval: FixedPromptEval,
        gold: bool,
        ptx: PtxLoss | None = None,
        sample_every: int = 0,
        cost_limit: float | None = None,
        safe_responses: list[list[int]] | None = None,
        score_batch_size: int = 128,
    ):
        """``cost_limit``: ``lagrange.cost_limit``; with ``safe_responses`` (tokenized safe
        conversations, ``lagrange.cost_limit_from=safe_responses``) it is measured from their
        mean cost, scored at the start of training ``score_batch_size`` at a time."""
        super().__init__()
        self.automatic_optimization = False
        # Without a reference model the actor is a LoRA model whose base is the reference.
        self.actor = models.actor.train()
        self.reference = _frozen(models.reference) if models.reference is not None else None
        self.reward_model = _frozen(models.reward_model)
        self.reward_critic = models.reward_critic.train()
        self.cost_model = _frozen(models.cost_model) if models.cost_model is not None else None
        self.cost_critic = models.cost_critic.train() if models.cost_critic is not None else None
        self.lagrange = lagrange
        self.tokenizer, self.algo, self.sampling = models.tokenizer, algo, sampling
        self.fixed_eval, self.gold, self.ptx = fixed_eval, gold, ptx
        self.sample_every = sample_every
        self.configured_cost_limit = cost_limit
        self.safe_responses, self.score_batch_size = safe_responses, score_batch_size
        self.safe_response_cost: float | None = None  # measured in on_train_start
        self.history: list[dict[str, float]] = []
        self.initial_eval: dict[str, float] | None = None
        self._resume_rng_state: tuple | None = None  # (CPU state, CUDA states or None)
        self.final_eval: dict[str, float] | None = None
        self.optimizer_names: list[str] = []  # set by configure_optimizers, in its order
        # λ moves by its own rule on every rank alike; DDP must not average its gradient.
        self._ddp_params_and_buffers_to_ignore = ["lagrange.log_lambda"]

    def configure_model(self) -> None:
        trained = [self.actor, self.reward_critic, self.cost_critic]
        shard_for_strategy(self, trained, [self.reference, self.reward_model, self.cost_model])

    @property
    def constrained(self) -> bool:
        return self.lagrange is not None

    @property
    def cost_limit(self) -> float | None:
        """d as the run uses it: ``lagrange.cost_limit``, measured from the safe responses'
        mean cost once that is known."""
        if self.safe_response_cost is None:
            return self.configured_cost_limit
        return self.configured_cost_limit + self.safe_response_cost

    def configure_optimizers(self):
        """AdamW and a learning-rate schedule for each trained network, then λ's optimizer
        (if its rule has one). ``optimizer_names`` keeps the order, which the schedules share."""
        ptx_separate = self.ptx is not None and self.algo.ptx_mode == "separate"
        optimizers, schedules = make_optimizers(
            self.actor, self.reward_critic, self.cost_critic, self.algo, ptx_separate
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
        scores = score_rollout(
            rollout, self.actor, self.reference, self.reward_model, self.reward_critic,
            self.cost_model, self.cost_critic, packed=a.packed_rollouts,
        )  # fmt: skip
        scored = self._clock()

        # 3. advantages: KL-shaped per-token reward (and cost), GAE for each
        experience = make_experience(rollout, scores, self.tokenizer.eos_token_id, a)
        metrics: dict[str, float] = {}
        episode_cost = None
        if self.constrained:
            # 4. λ from the recent mean episode cost (once here, or before every minibatch)
            episode_cost = self.lagrange.record(experience.cost)
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
                lambda_value = self.lagrange.value if self.constrained else None
                mb = select_minibatch(rollout, experience, rows, lambda_value)
                step = update_actor(self.actor, mb, a, self.ptx, self._update)
                step |= update_critics(self.reward_critic, self.cost_critic, mb, a, self._update)
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
        metrics |= {"iteration": float(batch_idx + 1), **rollout_metrics(rollout, experience)}
        metrics |= {
            "time/generation": generated - started,
            "time/scoring": scored - generated,
            "time/update": updated - scored,
        }
        networks = (self.actor, self.reward_critic, self.cost_critic)
        stop_if_non_finite(self.trainer, f"PPO iteration {batch_idx + 1}", metrics, networks)
        responses = decode_responses(self.tokenizer, rollout)
        if self.gold:
            metrics |= {
                f"gold/{k}": v for k, v in gold_metrics(batch["prompts"], responses).items()
            }
        self.history.append(metrics)
        self.log_dict(metrics, on_step=True, prog_bar=False)
        self._log_samples(batch_idx, batch["prompts"], responses, experience)

    def _clock(self) -> float:
        """Wall time once the GPU has run what is queued, so each phase is timed by its own
        work (CUDA calls return before their kernels finish)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _log_samples(self, batch_idx: int, prompts, responses, experience) -> None:
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
                experience.reward[i].item(),
                experience.cost[i].item() if experience.cost is not None else math.nan,
            ]
            for i, (p, r) in enumerate(zip(prompts[:8], responses[:8], strict=True))
        ]
        self.logger.log_table(
            key="samples", columns=["iteration", "prompt", "response", "reward", "cost"], data=rows
        )

    # -- the fixed-prompt evaluation before and after training --------------------------------

    def on_train_start(self) -> None:
        if self.constrained and self.safe_responses is not None:
            # On the device and, when sharded, on every rank alike; a resumed run measures the
            # same frozen cost model on the same responses again.
            self.safe_response_cost = mean_cost(
                self.cost_model, self.safe_responses, self.tokenizer.pad_token_id,
                self.score_batch_size,
            )  # fmt: skip
            self.lagrange.cost_limit = self.cost_limit
        if self.initial_eval is None:  # a resumed run keeps the one it measured before training
            self.initial_eval = self._evaluate_fixed_prompts()

    def on_train_end(self) -> None:
        self.final_eval = self._evaluate_fixed_prompts()

    def _evaluate_fixed_prompts(self) -> dict[str, float]:
        return self.fixed_eval(self.actor, self.tokenizer, self.reward_model, self.cost_model)

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
    eval_prompts = judged_prompts(test_prompts, cfg.eval)
    ptx = None
    if algo.ptx_coef > 0:
        conversations = (
            views.preferred_conversations
            if algo.ptx_data == PtxData.preferred
            else views.conversations
        )
        pairs = conversations(loaded.splits["train"])  # single-preference rows too
        examples = tokenize_sft_examples(
            tokenizer, [p for p, _ in pairs], [r for _, r in pairs], cfg.model.max_length
        )
        ptx = PtxLoss(examples, algo.ptx_batch_size, tokenizer.pad_token_id, pack_length(cfg.model))

    safe_responses = None
    if uses_cost and cfg.lagrange.cost_limit_from == CostLimitOrigin.safe_responses:
        safe = [i for i in views.qa_items(loaded.splits["train"]) if i.is_safe]
        if not safe:
            raise ConfigError(
                "lagrange.cost_limit_from=safe_responses: the train split has no response "
                "labelled safe to measure the cost limit from"
            )
        safe = safe[:SAFE_RESPONSES_SCORED]
        safe_responses = tokenize_conversations(
            tokenizer, [i.prompt for i in safe], [i.response for i in safe], cfg.model.max_length
        )

    static_prompt_width = max_prompt if decodes_compiled(algo, cfg.trainer) else None
    sampling = dict(
        cfg.eval.sampling,
        static_prompt_width=static_prompt_width,
        compile_decoding=static_prompt_width is not None,
        gather_weights=algo.gather_actor_for_decoding,
    )
    gold = cfg.data.source == "benchmark"
    fixed_eval = FixedPromptEval(
        eval_prompts, tokenize_prompts(tokenizer, eval_prompts, max_prompt), sampling,
        cfg.eval.seed, cfg.eval.batch_size, cfg.model.max_length, gold,
    )  # fmt: skip
    module = PPOModule(
        models, lagrange, algo, sampling, fixed_eval, gold, ptx, cfg.task.sample_every,
        cfg.lagrange.cost_limit if uses_cost else None, safe_responses, cfg.eval.batch_size,
    )  # fmt: skip
    data = PromptDataModule(
        train_prompts, tokenize_prompts(tokenizer, train_prompts, max_prompt), algo.iterations,
        algo.rollout_batch_size, cfg.seed,
    )  # fmt: skip
    hardware = trainer_arguments(cfg.trainer, networks_apart=True)
    hardware.pop("log_every_n_steps")  # one step is a whole PPO iteration: log every one
    checkpoint_path = run.run_dir / "checkpoints" / "last.ckpt"
    trainer = pl.Trainer(
        **hardware,
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
    if uses_cost:
        metrics["lagrange/cost_limit"] = module.cost_limit  # d as the run used it
    if module.safe_response_cost is not None:
        metrics["lagrange/safe_response_cost"] = module.safe_response_cost
    policy = module.actor.merge_and_unload() if algo.lora_rank > 0 else module.actor
    export_artifact(trainer, policy, tokenizer, artifact)  # a plain causal LM either way
    if trainer.is_global_zero:
        (run.run_dir / "ppo_history.json").write_text(json.dumps(module.history, indent=1) + "\n")
    return TaskResult(
        metrics,
        {"policy": str(artifact), "history": str(run.run_dir / "ppo_history.json")},
        variant=ppo_variant(cfg),
    )
