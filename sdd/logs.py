"""A quiet log: each message once, and no library warnings that are not the user's concern.

Hydra configures the root logger (console and ``<run>/<task>.log``) before a job starts. Two libraries
then print on their own as well:

- ``lightning`` adds a console handler of its own to its ``lightning`` logger whenever it is imported,
  and lets records propagate to the root as well, so every Lightning line ("Seed set to 0", "GPU
  available") printed twice: ``INFO: ...`` and Hydra's ``[time][name][INFO] - ...``;
- ``lightning.pytorch`` / ``lightning.fabric``, when imported before the root had a handler, print on
  their own handler and never reach Hydra's log file.

:func:`quiet_libraries` removes those console handlers (the root's handlers print every record once) and
filters what no user acts on: Lightning's product tips, DeepSpeed's "Setting accelerator to CPU" on a
machine without a GPU, and the warnings of :data:`IGNORED_WARNINGS`. It runs once per job through
:class:`QuietLogs`, a Hydra callback of ``conf/hydra/default.yaml`` shared by every entry point.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from hydra.experimental.callback import Callback

# (message regex, category): library warnings about the libraries' own internals or about choices we made.
IGNORED_WARNINGS = (
    # torch deprecates LeafSpec; Lightning's pytree helper still builds one on every step.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # Our data modules return no validation loader when a run has no validation split.
    (r"Total length of `\w+` across ranks is zero", Warning),
    # Data are tokenized in memory; loader workers would only add processes on a 2-core machine.
    (r".*does not have many workers", Warning),
    # peft reads transformers' deprecated attribute when it wraps a model in LoRA adapters.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
# Lines that advertise a product or state the obvious on a CPU machine, by the logger that emits them.
DROPPED_LINES = {
    "lightning.pytorch.utilities.rank_zero": re.compile(r"💡 Tip:"),
    "lightning.fabric.utilities.rank_zero": re.compile(r"💡 Tip:"),
    "DeepSpeed": re.compile(r"Setting accelerator to CPU"),
}


class _DropMatching(logging.Filter):
    """Drops the records whose message matches ``pattern``."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_libraries() -> None:
    """Print each library message once through the root's handlers, without tips or irrelevant warnings.

    Safe to call more than once. Lightning is imported here (every entry point that trains or evaluates
    imports it anyway) so that its console handler exists and can be removed.
    """
    for pattern, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, pattern in DROPPED_LINES.items():
        # A logger's filters apply to the records logged on it, before any handler: set before the library
        # configures the logger (DeepSpeed's adds a handler at import), they stay.
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    if not logging.getLogger().handlers:  # no root handler (a plain script): Lightning's own handlers are the only ones
        return
    import lightning  # noqa: F401  (adds its console handler; removed below)

    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # a console handler of the library, not a file
                logger.removeHandler(handler)
        logger.propagate = True


class QuietLogs(Callback):
    """Hydra callback: :func:`quiet_libraries` at the start of every job, after Hydra configured logging."""

    def on_job_start(self, config: Any = None, **kwargs: Any) -> None:
        quiet_libraries()
