"""When a PPO run refreshes its resumable checkpoint."""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning.callbacks import Callback


class IterationCheckpoint(Callback):
    """Refresh ``checkpoints/last.ckpt`` every N PPO iterations (``global_step`` counts every
    optimizer step under manual optimisation, so it cannot be used for this)."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.every == 0:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state, to resume
