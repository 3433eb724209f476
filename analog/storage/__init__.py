"""Crash-safe, memory-mapped storage of per-example logs."""

from analog.storage.dataset import LogBatches, build_log_dataloader
from analog.storage.layout import StoreError
from analog.storage.reader import LogBatch, LogStore
from analog.storage.writer import LogWriter

__all__ = ["LogBatch", "LogBatches", "LogStore", "LogWriter", "StoreError", "build_log_dataloader"]
