"""Run by tests/test_distributed.py under ``torchrun``: tiny fits of the autoencoder, a classifier,
an invariance INN and a concept INN; rank 0 writes the losses and final weights' checksums to ``out/result.json``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from captum_inn.datasets import ColorDigits
from captum_inn.models import SmallCNN
from captum_inn.training import (
    fit_autoencoder,
    fit_concepts,
    fit_invariances,
    load_autoencoder,
    load_concept_inn,
)
from captum_inn.training.classifier import fit_classifier
from captum_inn.training.distributed import world

torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--encoder", required=True, help="autoencoder checkpoint the INNs are fitted on")
    args = parser.parse_args()
    out = Path(args.out)
    data = ColorDigits("train", recolorings=1, seed=0)
    images = data.images[:512]
    # constant learning rates: a fit stopped at step k and resumed to n steps then equals a fit of n steps.
    # The checkpointed fits show rank 0's progress bars: their "(resumed at step k)" tells a resumed fit
    # from a fresh one, which a deterministic fit's losses and weights cannot
    ae = fit_autoencoder(images, latent_dim=8, width=8, steps=args.steps, batch_size=32, lr=2e-3, schedule="constant",
                         checkpoint=str(out / "ae.safetensors"), checkpoint_every=40, progress=True)
    # each process trains on its shard with its share of the batch; the replicas must stay identical
    classifier = fit_classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)),
                                (images, data.digits[:512]), steps=args.steps, batch_size=32, lr=2e-3, progress=False)
    # the INNs are fitted on a given encoder, so that 1 and N processes solve the same problem
    torch.manual_seed(0)
    model, encoder = SmallCNN(width=4).eval(), load_autoencoder(args.encoder)
    inn = fit_invariances(model, "fc", encoder, images, steps=args.steps, batch_size=32, n_blocks=2, hidden=32, embed_dim=8,
                          lr=2e-3, checkpoint_dir=str(out / "inv"), checkpoint_every=40, progress=True)
    e = fit_concepts(encoder, data.concepts("differ"), factor_sizes={"digit": 4, "foreground": 1, "background": 1},
                     steps=args.steps, batch_size=32, pool_size=512, n_blocks=2, hidden=32, lr=2e-3, schedule="constant",
                     checkpoint=str(out / "concepts.safetensors"), checkpoint_every=40, progress=True)
    # every rank may load the concept INN at once: the file already holds the finished fit's results
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_concept_inn(str(out / "concepts.safetensors"))
    assert loaded.fit_info["factor_variance"] == e.fit_info["factor_variance"]
    rank, size = world()
    if rank == 0:
        result = {
            "world_size": size,
            "history": {"autoencoder": ae.history, "invariance": inn.history, "concepts": e.history},
            "weights": {name: [float(t.double().sum()) for t in m.state_dict().values()]
                        for name, m in (("autoencoder", ae), ("invariance", inn), ("concepts", e))},
        }
        (out / "result.json").write_text(json.dumps(result))
    if size > 1:  # every rank must hold the same model
        for label, m in (("autoencoder", ae), ("invariance", inn), ("concepts", e), ("classifier", classifier)):
            for key, t in m.state_dict().items():
                flat = t.reshape(-1).double()
                gathered = [torch.empty_like(flat) for _ in range(size)]
                torch.distributed.all_gather(gathered, flat)
                assert torch.equal(gathered[1], gathered[0]), f"replicas of the {label} diverged at {key}"
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()
        # torch 2.14 + gloo sometimes aborts in its exit-time destructors ("terminate called without an
        # active exception") after autograd ran, even in a 15-line script without captum_inn; all work is
        # done and written by now, so skip the interpreter's teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
