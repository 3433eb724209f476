"""Memory held by the writer is bounded by the flush threshold in bytes, whatever the disk speed."""

import json
import subprocess
import sys
import textwrap
import threading
import time

import torch

from analog.storage import LogStore, LogWriter

FIELDS = [{"module": "m", "kind": "grad", "shape": [256]}]  # 1 KiB per example in float32
ROWS, FLUSH = 16, 40 * 1024  # 16 KiB batches, 40 KiB threshold


class SlowWriter(LogWriter):
    """A writer on a slow disk that records how many bytes it holds after every ``write``."""

    def __init__(self, *args, delay=0.01, **kwargs):
        self.delay, self.in_flight, self.peaks = delay, 0, []
        self.lock_ = threading.Lock()
        super().__init__(*args, **kwargs)

    def _submit(self):
        with self.lock_:
            self.in_flight += self._buffer_bytes
        super()._submit()

    def _write_chunk(self, index, ids, parts, stats):
        time.sleep(self.delay)
        super()._write_chunk(index, ids, parts, stats)
        with self.lock_:
            self.in_flight -= sum(p.numel() * p.element_size() for p in parts)

    def write(self, ids, rows, stats=None):
        super().write(ids, rows, stats)
        with self.lock_:
            self.peaks.append((self._buffer_bytes, self.in_flight))


def test_buffer_and_chunks_bounded_by_flush_bytes_on_a_slow_disk(tmp_path):
    w = SlowWriter(tmp_path / "s", FIELDS, flush_bytes=FLUSH)
    batch_bytes = ROWS * 1024
    for b in range(30):
        ids = list(range(b * ROWS, (b + 1) * ROWS))
        w.write(ids, torch.arange(ROWS * 256, dtype=torch.float32).reshape(ROWS, 256) + b)
    buffered = max(p[0] for p in w.peaks)
    held = max(p[0] + p[1] for p in w.peaks)
    assert buffered < FLUSH, "the buffer is handed over as soon as it reaches flush_bytes"
    # double buffering: one chunk on its way to disk plus the buffer being filled, never more
    assert held <= FLUSH + (FLUSH + batch_bytes), f"writer held {held} bytes with flush_bytes={FLUSH}"
    assert max(p[1] for p in w.peaks) <= FLUSH + batch_bytes
    w.close()
    sizes = [json.loads(p.read_text())["nbytes"] for p in sorted((tmp_path / "s").glob("chunk_*.json"))]
    assert len(sizes) >= 8
    assert all(FLUSH <= s < FLUSH + batch_bytes for s in sizes[:-1]), sizes
    assert 0 < sizes[-1] < FLUSH + batch_bytes
    assert sum(sizes) == 30 * batch_bytes
    for p in sorted((tmp_path / "s").glob("chunk_*.bin")):
        assert p.stat().st_size == json.loads(p.with_suffix(".json").read_text())["nbytes"]
    store = LogStore(tmp_path / "s")
    assert len(store) == 30 * ROWS
    assert torch.equal(store.rows(17, 18)[0], torch.arange(256, dtype=torch.float32) + 1 * 256 + 1)


def test_flush_writes_everything_and_close_is_idempotent(tmp_path):
    w = LogWriter(tmp_path / "s", FIELDS, flush_bytes=10**9)
    w.write([0, 1], torch.ones(2, 256))
    assert not list((tmp_path / "s").glob("chunk_*.json")), "below the threshold nothing is written yet"
    w.flush()
    assert len(LogStore(tmp_path / "s")) == 2
    w.close()
    w.close()
    assert len(LogStore(tmp_path / "s")) == 2


RSS_CHILD = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    from analog.storage import LogWriter
    w = LogWriter(sys.argv[1], [{"module": "m", "kind": "grad", "shape": [4096]}], flush_bytes=2 * 2**20)
    rows = torch.randn(64, 4096)                      # 1 MiB per batch
    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # MiB
    for b in range(8):
        w.write(range(b * 64, (b + 1) * 64), rows.clone())
    w.flush()
    warm = rss()
    for b in range(8, 56):                            # 48 MiB more
        w.write(range(b * 64, (b + 1) * 64), rows.clone())
    w.close()
    print(warm, rss())
""")


def test_peak_memory_does_not_grow_with_examples_logged(tmp_path):
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "s")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    warm, peak = map(int, out.stdout.split())
    assert peak - warm < 24, f"peak RSS grew by {peak - warm} MiB while logging 48 MiB (flush_bytes 2 MiB)"
    assert len(LogStore(tmp_path / "s")) == 56 * 64
