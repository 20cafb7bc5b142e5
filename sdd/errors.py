"""Errors a user can cause and fix, and the checks that raise them before anything heavy runs.

Every exception that derives from :class:`UserError` carries a message that names the fix; the entry
points (:mod:`sdd.cli`) print it as one line instead of a traceback.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Marker: bad input or a bad setting the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
    """A config value is invalid, or conflicts with what is on disk."""


class DataStreamError(ConfigError):
    """A training objective reads a data stream the configured data does not provide."""


class NoGPUError(UserError, RuntimeError):
    """The config asks for a CUDA GPU and none is visible."""


def require_device(device: Any, key: str) -> None:
    """Refuse a CUDA device (``cuda``, ``cuda:1``, ``gpu``) on a machine that has none.

    Args:
        device: the configured device; None and ``cpu`` always pass.
        key: the config key that set it, named in the message (``eval.device``).
    """
    if device is None or not str(device).lower().startswith(("cuda", "gpu")):
        return
    import torch

    if not torch.cuda.is_available():
        raise NoGPUError(
            f"{key}={device} asks for a CUDA GPU and none is visible on this machine. Fix: {key}=cpu (or "
            f"{key}=null: cuda when available, else cpu), or run on a GPU node."
        )
