"""Hydra finds sweepers only under ``hydra_plugins``: the resumable Optuna sweeper of ``sdd.worst_case_sweeper``.

The implementation (and optuna) is imported when the sweeper is built, not when Hydra scans its plugins.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ResumableOptunaSweeper(Sweeper):
    """``hydra/sweeper=worst_case_optuna``: the Optuna sweeper, resumable (see :mod:`sdd.worst_case_sweeper`)."""

    def __init__(self, **kwargs: Any) -> None:
        from sdd.worst_case_sweeper import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
