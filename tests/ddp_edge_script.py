"""Run by tests/test_distributed.py under ``torchrun``: ``train_loop`` edge cases of several processes.
Each rank writes what it saw to ``out/rank{r}.json``:

- the step of the checkpoint right after ``train_loop`` returned (the other ranks went on before
  rank 0 had written the last one, on a module without floating-point buffers);
- the weights of two heads, one trained on each rank's data (a branch the data decides, so a
  parameter has a gradient on one rank only), which must stay identical on every rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from captum_inn.training.checkpoint import read_header
from captum_inn.training.distributed import world
from captum_inn.training.loop import train_loop

torch.set_num_threads(1)


def main() -> None:
    out = Path(sys.argv[1])
    rank, _ = world()
    torch.manual_seed(0)
    deep = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(6)])  # no buffers
    x = torch.randn(64, 128)

    def deep_loss(generator):
        rows = torch.randint(64, (8,), generator=generator)
        return deep(x[rows]).pow(2).mean()

    checkpoint = out / "deep.safetensors"
    train_loop(deep, deep_loss, steps=10, lr=1e-3, checkpoint=str(checkpoint), checkpoint_every=5, progress=False)
    step_seen = (read_header(str(checkpoint)) or {}).get("step")

    heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})
    data = torch.randn(16, 4) + (3.0 if rank == 0 else -3.0)  # rank 0's shard positive, rank 1's negative

    def head_loss(generator):
        head = heads["a"] if data.mean() > 0 else heads["b"]
        return head(data).pow(2).mean()

    start = {name: heads[name].weight.flatten().tolist() for name in heads}
    train_loop(heads, head_loss, steps=3, lr=0.1, progress=False, grad_clip=None)
    weights = {name: heads[name].weight.flatten().tolist() for name in heads}
    (out / f"rank{rank}.json").write_text(json.dumps({"step_seen": step_seen, "start": start, "weights": weights}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see docs/scale.rst: torch's exit-time destructors can abort after gloo


if __name__ == "__main__":
    main()
