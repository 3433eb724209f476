"""Running the passes a configuration needs, in order.

Most configurations need one pass over the data (log + collect K-FAC factors; EK-FAC's eigenvalue
correction and raw/diagonal statistics are then read from the stored logs, with no second model
pass). LoGra with ``init="pca"`` needs a first pass that gathers the uncompressed activation and
output-gradient covariances from which the projections are taken. ``AnaLogScheduler`` yields one
item per pass and moves the run from pass to pass; after the last it calls ``finalize()``::

    for _ in AnaLogScheduler(analog):
        for x, y, ids in loader:
            with analog(data_id=ids):
                loss_fn(model(x), y).backward()
            model.zero_grad()

LoGra ``init="query"`` has three passes, ``"pca"`` (training data), ``"query"`` (a sample of queries:
the measurement whose attribution is wanted, e.g. the loss of an answer) and ``"log"`` (training data),
so the loop picks its data by the pass's name::

    for phase in AnaLogScheduler(analog):
        for x, y, ids in (query_loader if phase == "query" else loader):
            with analog(data_id=ids):
                loss_fn(model(x), y).backward()
            model.zero_grad()

Under torch.distributed each rank runs its own part of the query sample (a rank may have none; use
the unwrapped model there, DDP's backward is a collective): the query Grams are summed over ranks.
A rank may likewise have no batch in the statistics or logging pass: it still iterates the scheduler
(next_pass and finalize are collective) and adds zeros to every sum.
"""

from __future__ import annotations

from typing import Iterator


class AnaLogScheduler:
    def __init__(self, analog):
        self.analog = analog

    def __len__(self) -> int:
        if self.analog.phase == "pca":
            return 3 if self.analog.projector.init == "query" else 2
        return 2 if self.analog.phase == "query" else 1

    def __iter__(self) -> Iterator[str]:
        if self.analog.phase == "pca":
            yield "pca"
            self.analog.next_pass()
        if self.analog.phase == "query":
            yield "query"
            self.analog.next_pass()
        yield "log"
        self.analog.finalize()
