"""Helpers shared by the defense tests: build a defense from conf/, take a batch, compare gradients."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from conftest import compose_config
from hydra.utils import instantiate


def make(kind: str, backbone, tmp_path, *overrides: str):
    """A defense's data module (connected, set up) and module (model loaded), from conf/.

    Full fine-tuning (``module.lora=null``), so that an objective's gradient identities are checked on every
    weight; the LoRA adapters some defenses train by default (Booster, Vaccine, T-Vaccine) run end to end.
    """
    cfg = compose_config(
        "train",
        ["experiment=quick_tiny", f"defense={kind}", "data.num_examples=16", "module.lora=null", *overrides],
        output_dir=tmp_path,
        cache_dir=tmp_path / "cache",
    )
    datamodule = instantiate(cfg.data)
    datamodule.connect(backbone.load_tokenizer())
    datamodule.setup("fit")
    module = instantiate(cfg.module, backbone=backbone)
    module.configure_model()
    return datamodule, module


def first_batch(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    return batch[0] if isinstance(batch, tuple) else batch  # CombinedLoader yields (batch, idx, loader idx)


def grads_of(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        g if g is not None else torch.zeros_like(p)
        for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))
    ]


def all_close(a: list[torch.Tensor], b: list[torch.Tensor], **tolerance) -> bool:
    return all(torch.allclose(x, y, **tolerance) for x, y in zip(a, b))


def logged(output_dir: Path) -> list[dict[str, str]]:
    """Every row of the CSV metrics a training run wrote under ``output_dir``."""
    rows = []
    for path in sorted(output_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as handle:
            rows += list(csv.DictReader(handle))
    return rows
