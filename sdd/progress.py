"""The training progress bar: Lightning's rich bar, without its "Epoch 0/-2" when a run is counted in steps.

Lightning writes ``Epoch <n>/<max_epochs - 1>``, which reads ``Epoch 0/-2`` for the step-limited runs of
``scale=cpu_demo`` (``max_epochs=-1``), and shows the logger's version (``v_num``) as if it were a metric.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from omegaconf import DictConfig


class TrainingProgressBar(RichProgressBar):
    """``Epoch 1/5``, or ``Epoch 1 (at most 40 steps)`` for a run bounded in steps; metrics without ``v_num``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return f"Epoch {current_epoch + 1}/{trainer.max_epochs}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return f"Epoch {current_epoch + 1} (at most {trainer.max_steps} steps)"
        return f"Epoch {current_epoch + 1}"

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def training_progress_bar(trainer_cfg: DictConfig) -> list[Any]:
    """``[TrainingProgressBar()]`` when the trainer shows a progress bar and rich is installed, else ``[]``
    (Lightning's default bar, or none)."""
    if not trainer_cfg.get("enable_progress_bar", True) or not _RICH_AVAILABLE:
        return []
    return [TrainingProgressBar()]
