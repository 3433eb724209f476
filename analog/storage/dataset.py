"""A PyTorch Dataset/DataLoader over a log store that yields whole batches.

Each item of ``LogBatches`` is a batch ``(ids, {module: {kind: tensor (B, *shape)}})`` read as one
contiguous range, so the DataLoader does no per-example collation (``batch_size=None``).
"""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from analog.storage.reader import LogBatch, LogStore


class LogBatches(Dataset):
    def __init__(self, store: LogStore, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.store, self.batch_size = store, int(batch_size)

    def __len__(self) -> int:
        return (len(self.store) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> LogBatch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.batch_size
        return self.store.batch(start, min(start + self.batch_size, len(self.store)))


def _identity(batch):
    return batch


def build_log_dataloader(store: LogStore, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
    """Batches of the store in order; ``num_workers`` processes read ahead."""
    return DataLoader(
        LogBatches(store, batch_size),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
    )
