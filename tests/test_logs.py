"""A quiet log: each Lightning line once through the root's handlers, no product tips, no library warnings that
are not the user's concern, in-process and in a real Hydra run."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import offline_env

from sdd.logs import LIGHTNING_LOGGERS, quiet_libraries

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hydra_like_root():
    """A root console handler as Hydra's job logging sets one; every touched logger restored afterwards."""
    import lightning  # noqa: F401  (its console handler, as in any run that trains)

    names = (*LIGHTNING_LOGGERS, "lightning.pytorch.utilities.rank_zero", "DeepSpeed")
    saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, list(logging.getLogger(n).filters))
        for n in names
    }
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    # Lightning's own console handler, as Lightning adds it at import (here writing where the test can read it).
    own = io.StringIO()
    lightning_handler = logging.StreamHandler(own)
    logging.getLogger("lightning").addHandler(lightning_handler)
    try:
        yield stream, own
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name, (handlers, propagate, filters) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.filters[:] = filters


def test_a_lightning_line_is_printed_once_and_a_product_tip_not_at_all(hydra_like_root):
    stream, own = hydra_like_root
    quiet_libraries()
    quiet_libraries()  # a second job of a multirun: nothing doubles
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.info("GPU available: False, used: False")
    rank_zero.info("💡 Tip: For seamless cloud logging, try installing litlogger")
    deepspeed_stream = io.StringIO()  # DeepSpeed prints on its own handler (its logger does not propagate)
    logging.getLogger("DeepSpeed").addHandler(logging.StreamHandler(deepspeed_stream))
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    logging.getLogger("DeepSpeed").warning("a real DeepSpeed warning")
    assert stream.getvalue().count("GPU available: False") == 1 and own.getvalue() == ""
    assert "Tip" not in stream.getvalue()
    assert (
        "Setting accelerator" not in deepspeed_stream.getvalue()
        and "a real DeepSpeed warning" in deepspeed_stream.getvalue()
    )
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        assert logger.propagate and not [h for h in logger.handlers if type(h) is logging.StreamHandler]


def test_library_warnings_that_are_not_the_users_concern_are_filtered():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", FutureWarning
        )
        warnings.warn("Total length of `list` across ranks is zero. Please make sure this was your intention.")
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.")
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("Something the user must see.")
    assert [str(w.message) for w in caught] == ["Something the user must see."]


def test_a_training_run_prints_each_line_once(tmp_path):
    env = offline_env(tmp_path / "cache")
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=quick_tiny",
            "trainer.max_steps=2",
            "sample_prompts=null",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("Seed set to 0") == 1 and output.count("GPU available: False") == 1
    for unwanted in (
        "💡",
        "LeafSpec",
        "across ranks is zero",
        "does not have many workers",
        "Setting accelerator to CPU",
        "INFO: ",
    ):
        assert unwanted not in output, unwanted
    # Hydra's log file gets Lightning's lines too (they reach the root's handlers).
    log_file = next((tmp_path / "logs" / "quick_tiny" / "runs").glob("*/train.log"))
    assert "Seed set to 0" in log_file.read_text()


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "shown"),
    [
        (-1, 40, "Epoch 1 (at most 40 steps)"),  # scale=cpu_demo: Lightning itself writes "Epoch 0/-2"
        (5, -1, "Epoch 1/5"),
        (-1, -1, "Epoch 1"),
    ],
)
def test_the_training_progress_bar_counts_epochs_from_one_and_names_a_step_limit(max_epochs, max_steps, shown):
    from types import SimpleNamespace

    from sdd.progress import TrainingProgressBar

    bar = TrainingProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps)
    assert bar._get_train_description(0) == shown
