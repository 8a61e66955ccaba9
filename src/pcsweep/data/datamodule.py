"""Minibatches for Lightning from tensors already on the training device (kept apart from
``pcsweep.data.datasets`` so that reading the settings does not import Lightning)."""

from __future__ import annotations

from typing import Iterator, Optional

import lightning as L
import torch
from torch import Tensor

from pcsweep.data.datasets import Dataset, Split


class TensorBatches:
    """Minibatches sliced from tensors already on the device; the order is a function of (seed, epoch) so a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, seed: int = 0, epoch_fn=lambda: 0):
        self.split, self.batch_size, self.shuffle, self.seed, self.epoch_fn = split, batch_size, shuffle, seed, epoch_fn
        self.trained = (0, 0)  # (epoch, batches of it trained): set by the trainer's callback after every batch
        self._resume: Optional[tuple[int, int]] = None

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    # Lightning saves and restores these with its loops (a "stateful" loader): a run resumed from a mid-epoch
    # checkpoint continues the epoch with the batch after the last one trained, not from its start
    def state_dict(self) -> dict:
        return {"epoch": self.trained[0], "batches": self.trained[1]}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, epoch = len(self.split), int(self.epoch_fn())
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen).to(self.split.inputs.device)
        for start in range(skip * self.batch_size, n, self.batch_size):
            if self.shuffle:
                idx = order[start : start + self.batch_size]
                yield self.split.inputs[idx], self.split.labels[idx]
            else:
                yield (
                    self.split.inputs[start : start + self.batch_size],
                    self.split.labels[start : start + self.batch_size],
                )


class TensorDataModule(L.LightningDataModule):
    """Holds a whole ``Dataset`` on the training device. Lightning's per-epoch validation loop evaluates the test
    split (dataloader 0, the paper's curves) and, if there is one, the validation split (dataloader 1)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, eval_batch_size: int = 2048):
        super().__init__()
        self.dataset, self.batch_size, self.seed, self.eval_batch_size = dataset, batch_size, seed, eval_batch_size
        self.train_split, self.test_split, self.val_split = dataset.train, dataset.test, dataset.val

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.train_split, self.test_split = self.dataset.train.to(device), self.dataset.test.to(device)
        self.val_split = self.dataset.val.to(device) if self.dataset.val is not None else None

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> TensorBatches:
        return TensorBatches(self.train_split, self.batch_size, shuffle=True, seed=self.seed, epoch_fn=self._epoch)

    def val_dataloader(self) -> list[TensorBatches]:
        splits = [self.test_split] + ([self.val_split] if self.val_split is not None else [])
        return [TensorBatches(split, self.eval_batch_size, shuffle=False) for split in splits]
