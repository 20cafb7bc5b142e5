"""Several named data sets drawn side by side: the data of defenses that need more than one batch per step.

SEAM takes a harmful, a benign and an alignment batch at every step; Booster, Vaccine, RepNoise and TAR
mix harmful and alignment batches. Each stream is a complete :class:`ConversationDataModule` (so it is
formatted and masked like every other data set); a training batch is ``{stream name: batch}``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import lightning as L
from lightning.pytorch.utilities import CombinedLoader

from sdd.datamodules.conversations import ConversationDataModule

log = logging.getLogger(__name__)


class MultiStreamDataModule(L.LightningDataModule):
    """Named data modules whose train batches are drawn together, one batch of each per step.

    Args:
        streams: stream name -> a ConversationDataModule (e.g. ``harmful``, ``benign``, ``alignment``).
            Shorter streams are cycled until the longest one is exhausted (one epoch = the longest).
        num_examples, batch_size, max_length: the shared sizes; the stream configs interpolate them
            (``batch_size: ${data.batch_size}``), so ``data.batch_size=8`` sizes every stream at once.
    """

    def __init__(
        self,
        streams: Mapping[str, ConversationDataModule],
        num_examples: int | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if not streams:
            raise ValueError("data.streams is empty: name at least one stream (e.g. harmful, benign).")
        self.streams = dict(streams)
        for name, stream in self.streams.items():
            if not isinstance(stream, ConversationDataModule):
                raise TypeError(f"data.streams.{name} must be a ConversationDataModule config, got {type(stream)}")
        self.num_examples, self.batch_size, self.max_length = num_examples, batch_size, max_length
        self.stats: dict[str, Any] = {}
        self.manifest: dict[str, Any] | None = None

    def connect(self, tokenizer, max_length: int | None = None) -> None:
        for stream in self.streams.values():
            stream.connect(tokenizer, max_length)

    def prepare_data(self) -> None:
        for stream in self.streams.values():
            stream.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for stream in self.streams.values():
            stream.setup(stage)
        self.stats = {name: stream.stats for name, stream in self.streams.items()}
        manifests = {n: s.manifest for n, s in self.streams.items() if getattr(s, "manifest", None) is not None}
        self.manifest = manifests or None

    @property
    def stream_names(self) -> list[str]:
        """The keys of a training batch."""
        return list(self.streams)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {name: stream.train_dataloader() for name, stream in self.streams.items()}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> CombinedLoader | list:
        loaders = {name: s.val_dataloader() for name, s in self.streams.items() if s.val_set is not None}
        return CombinedLoader(loaders, mode="max_size_cycle") if loaders else []


def batch_streams(datamodule: Any) -> list[str]:
    """The named streams of the batches a data module yields (empty for plain single-stream data).

    Multi-stream data yields ``{stream: batch}``; preference data ``{"chosen": batch, "rejected": batch}``.
    """
    from sdd.datamodules.preference import PreferenceDataModule

    if isinstance(datamodule, PreferenceDataModule):
        return ["chosen", "rejected"]
    return list(getattr(datamodule, "stream_names", None) or [])
