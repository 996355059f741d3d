"""Run by tests/test_distributed.py under ``torchrun``: ``train_loop`` edge cases of several processes.
Each rank writes what it saw to ``out/rank{r}.json``:

- the step of the checkpoint right after ``train_loop`` returned (the other ranks went on before
  rank 0 had written the last one, on a module without floating-point buffers);
- the weights of two heads, one trained on each rank's data (a branch the data decides, so a
  parameter has a gradient on one rank only), which must stay identical on every rank;
- each rank's augmentation generator after a fit resumed from a checkpoint, which must be where an
  uninterrupted fit leaves it although the ranks draw different numbers (shards smaller than the
  batch);
- the error each rank raised when one rank alone failed: ``fit_invariances`` on a shard too small or
  with an infinite feature, ``fit_concepts`` on a NaN pair in one rank's pool, ``fit_classifier``'s
  attacked half on the smaller shard, a training step, a checkpoint folder rank 0 cannot write to,
  a checkpoint rank 0 fails to write midway, a checkpoint whose state for rank 1 alone is damaged.
  Every rank must raise; none may wait for the others.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.concepts import ConceptPairs
from captum_inn.training import fit_concepts, fit_invariances
from captum_inn.training.checkpoint import load_checkpoint, read_header, save_checkpoint
from captum_inn.training.classifier import fit_classifier
from captum_inn.training.distributed import world
from captum_inn.training.loop import train_loop

torch.set_num_threads(1)


class Log(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.log()


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

    # an augmentation's generator, drawn from more on rank 1 (its shard gave it a larger share of the batch)
    weight = torch.nn.Linear(1, 1)
    augmentation = torch.Generator()

    def augmented_loss(generator):
        noise = torch.rand(2 + rank, 1, generator=augmentation)
        return weight(noise).pow(2).mean()

    augmented = {}
    for run, stops in {"whole": (4,), "resumed": (2, 4)}.items():
        augmentation.manual_seed(7)
        for steps in stops:
            train_loop(weight, augmented_loss, steps=steps, lr=0.1, checkpoint=str(out / f"augmented_{run}.safetensors"),
                       checkpoint_every=2, generators=(augmentation,), progress=False)
        augmented[run] = torch.rand(1, generator=augmentation).item()  # where the stream stands

    # 3 images: rank 1's shard holds one, too few; 4 images with a black one in rank 1's shard (row 3),
    # whose log is -inf at layer "1"
    model = torch.nn.Sequential(Log(), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)).eval()
    autoencoder = ConvAutoencoder((3, 8, 8), latent_dim=2, width=4).eval()
    black = torch.cat([0.1 + 0.9 * torch.rand(3, 3, 8, 8), torch.zeros(1, 3, 8, 8)])
    # concept pairs drawn from 64 images, image 10 NaN: only rank 1's pool (seeded per rank) draws it
    pair_images = 0.1 + 0.9 * torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pair_images[10] = float("nan")
    pairs = ConceptPairs.from_labels("group", pair_images, torch.arange(64) % 4)
    torch.manual_seed(0)
    bn_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 8 * 8, 3))
    not_a_folder = out / "not_a_folder"
    not_a_folder.touch()

    def failing_loss(generator):  # a step that fails on rank 1's data only
        if rank == 1:
            raise ValueError("rank 1's batch cannot be used")
        return weight(torch.ones(2, 1)).pow(2).mean()

    cases = {
        "few": lambda: fit_invariances(model, "1", autoencoder, 0.1 + 0.9 * torch.rand(3, 3, 8, 8), steps=2,
                                       batch_size=2, n_blocks=2, hidden=8, embed_dim=4, progress=False),
        "infinite": lambda: fit_invariances(model, "1", autoencoder, black, steps=2, batch_size=2, n_blocks=2,
                                            hidden=8, embed_dim=4, progress=False),
        "pool": lambda: fit_concepts((model, "2"), [pairs], steps=2, pool_size=8, batch_size=4, n_blocks=2, hidden=8,
                                     progress=False),
        # 7 images: rank 0's batch 4, rank 1's 3, too few for an attacked half with batch norm
        "adversarial": lambda: fit_classifier(bn_model, (torch.rand(7, 3, 8, 8), torch.arange(7) % 3), steps=2,
                                              batch_size=8, adversarial_epsilon=0.1, progress=False),
        "step": lambda: train_loop(weight, failing_loss, steps=2, lr=0.1, progress=False),
        "checkpoint": lambda: train_loop(weight, augmented_loss, steps=2, lr=0.1, progress=False,
                                         checkpoint=str(not_a_folder / "fit.safetensors")),
    }
    errors = {}
    for case, run in cases.items():
        try:
            run()
            errors[case] = None
        except (ValueError, RuntimeError) as error:
            errors[case] = f"{type(error).__name__}: {error}"
    # a checkpoint whose augmentation state for rank 1 alone is damaged: rank 1 refused it alone
    if rank == 0:
        tensors, saved = load_checkpoint(str(out / "augmented_whole.safetensors"), kind="module")
        save_checkpoint(out / "damaged.safetensors", {**tensors, "rng.extra.0.1": torch.zeros(3)}, saved)
    torch.distributed.barrier()
    try:
        train_loop(weight, augmented_loss, steps=6, lr=0.1, progress=False, checkpoint=str(out / "damaged.safetensors"),
                   generators=(augmentation,))
        errors["damaged"] = None
    except ValueError as error:
        errors["damaged"] = f"{type(error).__name__}: {error}"
    # rank 0 cannot write a checkpoint midway (a full disk): the others stopped at their barrier
    import captum_inn.training.loop as loop

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    if rank == 0:
        loop.save_checkpoint = full_disk
    try:
        train_loop(weight, augmented_loss, steps=4, lr=0.1, progress=False, checkpoint=str(out / "full.safetensors"),
                   checkpoint_every=2)
        errors["write"] = None
    except (OSError, ValueError) as error:
        errors["write"] = f"{type(error).__name__}: {error}"
    (out / f"rank{rank}.json").write_text(json.dumps({"step_seen": step_seen, "start": start, "weights": weights,
                                                      "errors": errors, "augmented": augmented}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see docs/scale.rst: torch's exit-time destructors can abort after gloo


if __name__ == "__main__":
    main()
