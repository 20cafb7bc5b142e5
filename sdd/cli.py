"""What the entry points share: a failure the user can fix ends in one line that names the fix.

``train.py``, ``attack.py``, ``evaluate.py``, ``pipeline.py`` (under ``@hydra.main``) and ``report.py``
wrap their main function in :func:`user_errors`. A :class:`sdd.errors.UserError` (found anywhere in
the exception's cause chain, e.g. inside Hydra's ``InstantiationException``) or a full disk prints
``Error: <message>`` on stderr and exits with status 1. ``HYDRA_FULL_ERROR=1`` shows the traceback
instead; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from typing import Any, Callable, TypeVar

from sdd.credentials import scrub_text
from sdd.errors import UserError

log = logging.getLogger(__name__)

Function = TypeVar("Function", bound=Callable[..., Any])


def user_errors(function: Function) -> Function:
    """Run ``function``; a user-fixable failure becomes one line on stderr and exit status 1."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            message = user_message(error)
            if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.debug("Stopped by a user error", exc_info=True)
            print(f"Error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapper  # type: ignore[return-value]


def user_message(error: BaseException) -> str | None:
    """The one-line message of a user-fixable error in ``error``'s cause chain, else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError):
            return one_line(str(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return one_line(
                f"No space left on device while writing {current.filename or 'a file'}. Fix: free disk space "
                "(or point paths.log_dir / paths.cache_dir at a larger disk), then start the same command again; a "
                "training run resumes from its last complete checkpoint with hydra.run.dir=<its folder>."
            )
        current = current.__cause__ or current.__context__
    return None


def one_line(message: str) -> str:
    """``message`` on one line, without credentials."""
    return scrub_text(" ".join(message.split()))
