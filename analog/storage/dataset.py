"""A PyTorch Dataset/DataLoader over a log store that yields whole batches.

Each item of ``LogBatches`` is a batch ``(ids, {module: {kind: tensor (B, *shape)}})`` read as one
contiguous range, so the DataLoader does no per-example collation (``batch_size=None``).
"""

from __future__ import annotations

from typing import Optional

from torch.utils.data import DataLoader, Dataset

from analog.storage.reader import LogBatch, LogStore


class LogBatches(Dataset):
    """Batches of rows [start, stop) of ``store`` (the whole store by default)."""

    def __init__(self, store: LogStore, batch_size: int, start: int = 0, stop: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        stop = len(store) if stop is None else stop
        if not 0 <= start <= stop <= len(store):
            raise ValueError(f"rows [{start}, {stop}) out of range for a store of {len(store)} examples")
        self.store, self.batch_size, self.start, self.stop = store, int(batch_size), int(start), int(stop)

    def __len__(self) -> int:
        return (self.stop - self.start + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> LogBatch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = self.start + i * self.batch_size
        return self.store.batch(start, min(start + self.batch_size, self.stop))


def _identity(batch):
    return batch


def build_log_dataloader(store: LogStore, batch_size: int = 256, num_workers: int = 0, start: int = 0,
                         stop: Optional[int] = None) -> DataLoader:
    """Batches of the store (rows [start, stop), by default all) in order; ``num_workers`` processes read ahead."""
    return DataLoader(
        LogBatches(store, batch_size, start, stop),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
    )
