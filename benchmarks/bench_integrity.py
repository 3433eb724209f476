"""Integrity benchmark: what the per-chunk CRC-32 costs when a store is written and read.

A store of ``--rows`` rows of ``--dim`` float32 values (LoGra-sized rows) is written with LogWriter
(which checksums every chunk as it writes it), then read back three ways, alternating, best of
``--repeats``: a plain pass over every row (``LogStore.rows`` + a sum, the least work a reader does)
and an influence-style pass (one (16 × dim) @ (dim × batch) matmul per 1024 rows), each with
``verify=True`` (the default: every chunk's CRC-32 checked on first read) and ``verify=False``
(the documented fast path for trusted stores). A fresh LogStore per pass; "first pass" clears the
process's record of verified files so every chunk is checksummed, "later passes" keeps it (as a
second query batch in the same process would); the files stay in the page cache (warm reads: the
checksum's share is largest there — on a cold read the disk dominates both). Also: CRC-32 throughput alone, and
``analog store verify`` (structure + every checksum) on the same store.

    python -m benchmarks.bench_integrity                       # writes benchmarks/results/integrity.md
    python -m benchmarks.bench_integrity --rows 20000 --dim 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import zlib
from pathlib import Path

import torch

from analog.storage import LogStore, LogWriter
from analog.storage.integrity import VERIFIED, inspect_store

RESULTS = Path(__file__).parent / "results" / "integrity.md"


def write_store(path: Path, rows: int, dim: int) -> float:
    fields = [{"module": "m", "kind": "grad", "shape": [dim]}]
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    writer = LogWriter(path, fields, "float32", {}, flush_bytes=16 * 2**20, rank=0, world_size=1)
    for s in range(0, rows, 1024):
        n = min(1024, rows - s)
        writer.write(list(range(s, s + n)), torch.randn(n, dim, generator=gen))
    writer.close()
    return time.perf_counter() - start


def read_pass(path: Path, verify: bool, query, forget: bool = True) -> float:
    if forget:  # the first pass of a process over these files: every chunk is checksummed
        VERIFIED.clear()
    start = time.perf_counter()
    store = LogStore(path, verify=verify)
    total = 0.0
    for s in range(0, len(store), 1024):
        rows = store.rows(s, min(s + 1024, len(store)))
        total += float(rows.sum()) if query is None else float((query @ rows.T).sum())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print instead of writing the results file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        write_s = write_store(path, args.rows, args.dim)
        nbytes = sum(p.stat().st_size for p in path.glob("chunk_*.bin"))
        mib = nbytes / 2**20
        blob = (path / "chunk_000000.bin").read_bytes()
        start = time.perf_counter()
        zlib.crc32(blob)
        crc_mib_s = len(blob) / 2**20 / (time.perf_counter() - start)
        query = torch.randn(16, args.dim)
        times = {}
        for _ in range(args.repeats):
            passes = (("read, verify", True, None, True), ("read, again", True, None, False),
                      ("read, trusted", False, None, False), ("score, verify", True, query, True),
                      ("score, again", True, query, False), ("score, trusted", False, query, False))
            for name, verify, q, forget in passes:
                times[name] = min(times.get(name, float("inf")), read_pass(path, verify, q, forget))
        start = time.perf_counter()
        report = inspect_store(path)
        verify_s = time.perf_counter() - start
        assert report.ok and report.examples == args.rows
    lines = [
        "# Integrity benchmark",
        "",
        f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, 2 threads; "
        "shared machine (other jobs running), best of the repeats.",
        "",
        f"Command: `python -m benchmarks.bench_integrity --rows {args.rows} --dim {args.dim} "
        f"--repeats {args.repeats}`",
        "",
        f"Store: {args.rows} rows × {args.dim} float32 = {mib:.0f} MiB in {len(list(range(0, nbytes, 16 * 2**20)))} "
        f"chunks of ≤ 16 MiB; written (CRC-32 included) in {write_s:.2f} s ({mib / write_s:.0f} MiB/s).",
        f"CRC-32 alone (zlib): {crc_mib_s:.0f} MiB/s. `analog store verify`: {verify_s:.2f} s "
        f"({mib / verify_s:.0f} MiB/s).",
        "",
        "| pass over the whole store (warm page cache) | verify=True, first pass in the process (s) | "
        "verify=True, later passes (s) | verify=False (s) | cost of the first pass |",
        "|---|---|---|---|---|",
    ]
    for what, key in (("rows + sum", "read"), ("16 queries scored (matmul)", "score")):
        on, again, off = times[f"{key}, verify"], times[f"{key}, again"], times[f"{key}, trusted"]
        lines.append(f"| {what} | {on:.3f} | {again:.3f} | {off:.3f} | {(on / off - 1) * 100:+.0f} % |")
    load = os.getloadavg()[0]
    lines += ["", f"Load average during the run: {load:.1f} on {os.cpu_count()} cores — passes this short are noisy "
              "at that load; the checksum's own cost is bounded by the CRC-32 throughput above "
              f"({mib:.0f} MiB at that rate: about {mib / crc_mib_s:.2f} s per first pass over the store)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
