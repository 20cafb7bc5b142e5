"""Credentials never reach a file we write: ``scheme://user:password@host`` loses its userinfo.

An endpoint such as ``eval.judges.rubric.base_url`` may be given with credentials in it. Every config,
record and result the project writes goes through :func:`scrub_credentials`; Hydra's own copies of the
config (``.hydra/*.yaml``, ``multirun.yaml``) are rewritten by :class:`ScrubCredentialsCallback`, which
``conf/hydra/default.yaml`` registers for every entry point.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from hydra.experimental.callback import Callback
from hydra.types import RunMode

# scheme://<userinfo>@ : the userinfo runs up to the last "@" before the host's path, query or fragment.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s'\"<>@]*(?:@[^/?#\s'\"<>@]*)*@")
MASK = "***"


def scrub_text(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by ``***``."""
    return _URL_USERINFO.sub(lambda match: f"{match['scheme']}{MASK}@", text)


def scrub_credentials(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists, strings) with credentials removed from every URL.

    Other values (numbers, booleans, None) are returned unchanged.
    """
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {key: scrub_credentials(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_credentials(item) for item in value)
    return value


def scrub_files(paths: Iterable[Path]) -> None:
    """Rewrite each existing text file in place (atomically) if it holds a URL with credentials."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        scrubbed = scrub_text(text)
        if scrubbed != text:
            staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            staging.write_text(scrubbed, encoding="utf-8")
            staging.replace(path)


class ScrubCredentialsCallback(Callback):
    """Removes credentials from the config copies Hydra writes before a job starts.

    Hydra saves ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` (and a sweep's
    ``multirun.yaml``) just before it calls ``on_job_start``; this rewrites them then.
    """

    def on_job_start(self, config, **kwargs: Any) -> None:
        hydra = config.hydra
        if hydra.output_subdir is not None:
            scrub_files(sorted((Path(hydra.runtime.output_dir) / hydra.output_subdir).glob("*.yaml")))
        if hydra.mode == RunMode.MULTIRUN:
            scrub_files([Path(hydra.sweep.dir) / "multirun.yaml"])

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        scrub_files([Path(config.hydra.sweep.dir) / "multirun.yaml"])
