"""Log per-sample gradients under DistributedDataParallel and score influence sharded across ranks.

    torchrun --nproc_per_node=2 examples/ddp_logging.py            # gloo on CPU, NCCL when CUDA is present
    torchrun --nproc_per_node=2 examples/ddp_logging.py --root /tmp/analog_ddp --epochs 3

Each rank trains on its DistributedSampler shard; then every rank logs its shard's per-sample
gradients (LoGra rank 16, EK-FAC) into the one store of the project — rank 0's chunks are
``chunk_NNNNNN``, rank r's ``chunk_rRRR_NNNNNN`` — and ``finalize`` (collective) waits for every rank's
chunks, then fits the curvature with its statistics reduced across ranks. Influence of the training
examples on a few test examples is scored with each rank taking its share of the store and the top-k
merged across ranks; rank 0 prints it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from analog import AnaLog
from analog.analysis import InfluenceFunction


class Blobs(Dataset):
    """Gaussian blobs, one per class; items are (x, y, id)."""

    def __init__(self, n: int, seed: int, dim: int = 16, classes: int = 4):
        gen = torch.Generator().manual_seed(0)
        centres = torch.randn(classes, dim, generator=gen) * 2
        gen.manual_seed(seed)
        self.y = torch.randint(0, classes, (n,), generator=gen)
        self.x = centres[self.y] + torch.randn(n, dim, generator=gen)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "analog_ddp_example"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--topk", type=int, default=3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    project = Path(args.root) / "ddp_example"
    if rank == 0 and project.exists():
        shutil.rmtree(project)  # this example's own project: start afresh on every launch
    dist.barrier()

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    train = Blobs(args.n_train, seed=1)
    sampler = DistributedSampler(train, shuffle=True, seed=0, drop_last=True)  # disjoint shards, no repeats
    loader = DataLoader(train, batch_size=32, sampler=sampler)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y, _ in loader:
            loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}")

    # one logging pass over each rank's shard, through the DDP model (watching the wrapper is fine),
    # with the trained model in eval mode for logging and queries alike
    model.eval()
    run = AnaLog("ddp_example", {"root_dir": args.root, "hessian": "ekfac",
                                 "compression": {"type": "logra", "rank": 16}})
    run.watch(ddp)
    for x, y, ids in loader:
        with run(data_id=ids):
            loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device), reduction="sum")
            loss.backward()
        ddp.zero_grad()
    run.eval()  # collective: flush, barrier, EK-FAC with statistics reduced across ranks

    run.add_analysis({"influence": InfluenceFunction})
    test = Blobs(4, seed=2)
    with run(data_id=[f"test{i}" for i in range(len(test))]):
        nn.functional.cross_entropy(model(test.x.to(device)), test.y.to(device), reduction="sum").backward()
    model.zero_grad()
    top = run.influence.compute_influence_all(run.get_log(), topk=args.topk, distributed=True, progress=False)

    if rank == 0:
        store = run.open_store()
        print(f"world size {world}, backend {dist.get_backend()}: {len(store)} examples logged "
              f"({len(sampler)} per rank) into {run.log_path}")
        print("chunks:", sorted(p.name for p in run.log_path.glob("chunk_*.json")))
        for q, helpful, scores in zip(top.query_ids, top.helpful_ids, top.helpful_scores.tolist()):
            labels = [int(train.y[i]) for i in helpful]
            print(f"{q} (class {int(test.y[int(q[4:])])}): most helpful {helpful} (classes {labels}), "
                  f"scores {[round(s, 2) for s in scores]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
