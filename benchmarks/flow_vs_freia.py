"""``flow_step_vs_freia``: our conditional flow against the same architecture built from FrEIA.

    python benchmarks/flow_vs_freia.py --repeats 5          # prints the result dict as JSON

FrEIA (``pip install FrEIA``, the ``bench`` extra) is a benchmark-only dependency.

**What is compared.** The flow of the conditional INN ``t`` in the reference configuration, scaled
down: dimension 128, ``n_blocks`` in {8, 20}, subnet width 512, subnet depth 2, clamp 1, a 128-d
condition vector. Ours is ``SequentialFlow(flow_blocks(128, n_blocks, hidden=512, depth=2,
cond_dim=128, clamp=1.0))`` called with the condition as the embedding ``c`` (the condition
embedder of :class:`~captum_inn.inn.ConditionalINN` is left out on both sides: it would be the same
network in front of both flows). The FrEIA build is a ``FrEIA.framework.SequenceINN`` of, per
block, ``Fm.ActNorm`` → ``Fm.GLOWCouplingBlock`` (both halves, ``clamp=1.0``,
``clamp_activation="TANH"``, condition ``cond=0`` of shape ``(128,)``) → ``Fm.PermuteRandom``.

How the two match:

- subnets: the same ``nn.Sequential`` of ``Linear(64 + 128, 512)``, LeakyReLU(0.2),
  ``Linear(512, 512)``, LeakyReLU(0.2), ``Linear(512, 128)`` with the last layer zeroed; input
  ``[fixed half, condition]`` (FrEIA concatenates its ``cond`` inputs after the half, as we do),
  output ``[log-scale, shift]`` in the same order. FrEIA's subnets are loaded with our initial
  weights, and its permutations with ours, so both flows start from the same function.
- log-scale: ``clamp · tanh(s / clamp)`` (ours) and ``clamp · tanh(s)`` (FrEIA's ``"TANH"``) are the
  same function at ``clamp = 1``, our default.
- ActNorm: ours is ``(x + loc) · exp(log_scale)``, FrEIA's ``x · exp(scale) + bias``: the same
  family, both initialised from the first batch to zero mean and unit variance (ours adds
  ``eps = 1e-6`` to the std).

Differences: inside one block FrEIA's ``GLOWCouplingBlock`` transforms the first half first (given
the second), then the second half; ours transforms the second half first. With the random
permutations in between this is only a relabelling of the features; at initialisation (identity
couplings) both flows compute exactly the same function. FrEIA's ``PermuteRandom`` stores its
index as a frozen ``nn.Parameter``; only parameters that require gradients go to Adam on both sides.

**Data.** A fixed random conditional distribution with learnable structure:
``c ~ N(0, I_128)``, ``x = A · tanh(B c) + L ε`` with ``ε ~ N(0, I_128)`` and fixed random ``A``,
``B`` and lower-triangular ``L`` (correlated noise of varying scale), drawn from one seeded
generator. Training streams fresh pairs, 256 per step, each seen once (so the training NLL is not
an overfitting artefact); 2,048 further pairs are held out. Both flows get the same batches.

**Measurements.** (1) Speed: forward + backward + ``Adam.step`` training steps, timed in chunks of
``chunk`` steps alternately between ours and FrEIA (one warm-up chunk each, then ``repeats`` timed
chunks; median per step). (2) Quality: fresh flows (same initial weights) trained for ``steps``
steps at the same learning rate, same batches; reported are the training NLL per dimension
(nats, mean over the last 20 steps) and the NLL per dimension of the 2,048 held-out pairs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from measure import alternate, device, positive_int, threads  # noqa: E402

DIM, COND, HIDDEN, DEPTH, CLAMP, BATCH = 128, 128, 512, 2, 1.0, 256
BLOCKS = (8, 20)
LR = 5e-4


# ---------------------------------------------------------------- data
def make_data(n_train: int = 300 * BATCH, n_test: int = 2048, seed: int = 0) -> Dict[str, Tensor]:
    """Pairs ``(c, x)`` of the fixed conditional distribution ``x = A tanh(B c) + L ε``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(DIM, DIM, generator=g) * (2.0 / math.sqrt(DIM))
    b = torch.randn(DIM, COND, generator=g) * (1.5 / math.sqrt(COND))
    scales = torch.exp(torch.linspace(-2.0, 0.5, DIM))
    low = torch.tril(torch.randn(DIM, DIM, generator=g) * (0.3 / math.sqrt(DIM)), -1) + torch.diag(scales)

    def draw(n: int) -> Tuple[Tensor, Tensor]:
        c = torch.randn(n, COND, generator=g)
        x = torch.tanh(c @ b.T) @ a.T + torch.randn(n, DIM, generator=g) @ low.T
        return c, x

    c_train, x_train = draw(n_train)
    c_test, x_test = draw(n_test)
    return {"c": c_train, "x": x_train, "c_test": c_test, "x_test": x_test}


def batches(data: Dict[str, Tensor], n: int) -> List[Tuple[Tensor, Tensor]]:
    """``n`` consecutive training batches ``(x, c)``: every step sees fresh samples, as from a stream."""
    if n * BATCH > data["x"].shape[0]:
        raise ValueError(f"{n} batches need {n * BATCH} training pairs, got {data['x'].shape[0]}.")
    dev = device()
    return [(data["x"][i * BATCH:(i + 1) * BATCH].to(dev), data["c"][i * BATCH:(i + 1) * BATCH].to(dev))
            for i in range(n)]


# ---------------------------------------------------------------- the two flows
def build_ours(n_blocks: int) -> nn.Module:
    from captum_inn.inn import SequentialFlow, flow_blocks

    torch.manual_seed(0)
    return SequentialFlow(flow_blocks(DIM, n_blocks, hidden=HIDDEN, depth=DEPTH, cond_dim=COND, clamp=CLAMP, seed=0))


def _freia_subnet(dims_in: int, dims_out: int) -> nn.Module:
    net = nn.Sequential(
        nn.Linear(dims_in, HIDDEN), nn.LeakyReLU(0.2),
        nn.Linear(HIDDEN, HIDDEN), nn.LeakyReLU(0.2),
        nn.Linear(HIDDEN, dims_out),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def build_freia(ours: nn.Module) -> nn.Module:
    """The same architecture from FrEIA's blocks, starting from ``ours``' weights and permutations."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    from captum_inn.inn import ActNorm, AffineCoupling, Permutation

    inn = Ff.SequenceINN(DIM)
    units = [list(ours.blocks[i:i + 4]) for i in range(0, len(ours.blocks), 4)]
    for i, (norm, first, second, perm) in enumerate(units):
        assert isinstance(norm, ActNorm) and isinstance(perm, Permutation)
        assert isinstance(first, AffineCoupling) and isinstance(second, AffineCoupling)
        assert (first.parity, second.parity) == (0, 1)
        inn.append(Fm.ActNorm)
        inn.append(Fm.GLOWCouplingBlock, cond=0, cond_shape=(COND,), subnet_constructor=_freia_subnet,
                   clamp=CLAMP, clamp_activation="TANH")
        inn.append(Fm.PermuteRandom, seed=i)
        coupling, permute = inn.module_list[-2], inn.module_list[-1]
        # subnet1: from the first half (+c) to (s, t) of the second half = our parity-0 coupling;
        # subnet2: from the second half (+c) to (s, t) of the first half = our parity-1 coupling.
        coupling.subnet1.load_state_dict(first.subnet.state_dict())
        coupling.subnet2.load_state_dict(second.subnet.state_dict())
        with torch.no_grad():
            permute.perm.copy_(perm.perm)
            permute.perm_inv.copy_(perm.inverse_perm)
    return inn


def nll_per_dim(v: Tensor, logdet: Tensor) -> Tensor:
    """Negative log-likelihood per dimension (nats) under a standard normal prior, batch mean."""
    return (0.5 * v.pow(2).sum(1) - logdet).mean() / v.shape[1] + 0.5 * math.log(2 * math.pi)


class Trainer:
    """One flow, its Adam optimiser and a cursor over the shared batches."""

    def __init__(self, flow: nn.Module, call: Callable[[nn.Module, Tensor, Tensor], Tuple[Tensor, Tensor]],
                 data: List[Tuple[Tensor, Tensor]]) -> None:
        self.flow, self.call, self.data, self.cursor = flow, call, data, 0
        self.optimizer = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=LR)
        self.losses: List[float] = []

    def step(self) -> None:
        x, c = self.data[self.cursor % len(self.data)]
        self.cursor += 1
        v, logdet = self.call(self.flow, x, c)
        loss = nll_per_dim(v, logdet)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())

    def steps(self, n: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                self.step()
        return run

    @torch.no_grad()
    def test_nll(self, x: Tensor, c: Tensor) -> float:
        v, logdet = self.call(self.flow, x, c)
        return float(nll_per_dim(v, logdet))


class CapturedTrainer(Trainer):
    """Ours as ``train_loop`` trains on a CUDA device: eager warm-up steps, then the step captured
    once (:class:`~captum_inn.training.loop.CapturedStep`) and replayed; the loss is read each step."""

    def __init__(self, flow: nn.Module, call: Callable[[nn.Module, Tensor, Tensor], Tuple[Tensor, Tensor]],
                 data: List[Tuple[Tensor, Tensor]]) -> None:
        super().__init__(flow, call, data)
        self.optimizer = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=LR, foreach=True,
                                          capturable=True)
        self.captured = None

    def step(self) -> None:
        from captum_inn.training.loop import CapturedStep

        if self.captured is None and self.cursor >= CapturedStep.WARMUP_STEPS:
            torch.cuda.synchronize()
            self.captured = CapturedStep(self.flow, self.optimizer, lambda x, c: nll_per_dim(*self.call(self.flow, x, c)),
                                         self.data[self.cursor % len(self.data)], grad_clip=None)
        if self.captured is None:
            return super().step()
        x, c = self.data[self.cursor % len(self.data)]
        self.cursor += 1
        self.losses.append(self.captured.forward_backward((x, c))[0])
        self.captured.update()


def _call_ours(flow: nn.Module, x: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    return flow(x, c)


def _call_freia(flow: nn.Module, x: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    return flow(x, c=[c])


def _pair(n_blocks: int, data: List[Tuple[Tensor, Tensor]]) -> Dict[str, Trainer]:
    ours = build_ours(n_blocks).to(device())
    freia = build_freia(ours).to(device())
    with torch.no_grad():  # data-dependent ActNorm initialisation on the same first batch
        x, c = data[0]
        v_ours, _ = ours(x, c)
        v_freia, _ = freia(x, c=[c])
    assert torch.allclose(v_ours, v_freia, atol=1e-3), "the two flows must start from the same function"
    pair = {"ours": Trainer(ours, _call_ours, data), "freia": Trainer(freia, _call_freia, data)}
    if device().type == "cuda":  # the captured step fit_* can run on a GPU, on its own copy of ours
        pair["ours_captured"] = CapturedTrainer(copy.deepcopy(ours), _call_ours, data)
    return pair


# ---------------------------------------------------------------- the comparison
def bench_config(n_blocks: int, repeats: int, chunk: int = 20, steps: int = 300) -> Dict[str, Any]:
    n_batches = max(steps, (repeats + 1) * chunk)
    data = make_data(n_train=n_batches * BATCH)
    train = batches(data, n_batches)
    # (1) speed: fresh pair, chunks of `chunk` steps, alternating, one warm-up chunk each
    pair = _pair(n_blocks, train)
    times = alternate({name: t.steps(chunk) for name, t in pair.items()}, repeats)
    per_step = {name: {k: (v / chunk if k.endswith("_s") else v) for k, v in t.items()} for name, t in times.items()}
    # (2) quality: fresh pair from the same initial weights, the same batches, equal steps
    pair = _pair(n_blocks, train)
    wall = {}
    for name, trainer in pair.items():
        start = time.perf_counter()
        trainer.steps(steps)()
        wall[name] = time.perf_counter() - start
    nll = {name: {"train_last20": statistics.fmean(t.losses[-20:]),
                  "train_first": t.losses[0],
                  "test": t.test_nll(data["x_test"].to(device()), data["c_test"].to(device()))}
           for name, t in pair.items()}
    # the headline is the path the package trains with here: captured only where fits capture
    from captum_inn.training.loop import cuda_graphs_by_default

    path = "ours_captured" if "ours_captured" in pair and cuda_graphs_by_default() else "ours"
    ours_s, freia_s = per_step[path]["median_s"], per_step["freia"]["median_s"]
    return {
        "n_blocks": n_blocks,
        "ours_path": {"ours": "eager step", "ours_captured": "step captured as CUDA graphs (train_loop on CUDA)"}[path],
        "eager_speedup": freia_s / per_step["ours"]["median_s"],
        "ours_median_s": ours_s,
        "baseline_median_s": freia_s,
        "ratio": ours_s / freia_s,
        "speedup": freia_s / ours_s,
        "steps_per_s": {"ours": 1 / ours_s, "freia": 1 / freia_s},
        "per_step_times": per_step,
        "nll_after_steps": {"steps": steps, **nll},
        "training_steps_per_s": {name: steps / w for name, w in wall.items()},
        "parameters": {name: sum(p.numel() for p in t.flow.parameters() if p.requires_grad)
                       for name, t in pair.items()},
    }


def bench_flow_step_vs_freia(repeats: int, chunk: int = 20, steps: int = 300,
                             blocks: Tuple[int, ...] = BLOCKS) -> Dict[str, Any]:
    """Training steps per second and NLL after equal steps, ours vs FrEIA, for each block count."""
    import FrEIA

    configs = {f"{n}_blocks": bench_config(n, repeats, chunk, steps) for n in blocks}
    main = configs[f"{blocks[0]}_blocks"]
    return {
        "what": f"conditional flow training step (forward + backward + Adam), dim {DIM}, {COND}-d condition, "
                f"hidden {HIDDEN}, depth {DEPTH}, batch {BATCH}, {' and '.join(map(str, blocks))} blocks: "
                f"captum_inn SequentialFlow(flow_blocks) vs FrEIA {getattr(FrEIA, '__version__', '0.2')} "
                f"SequenceINN(ActNorm, GLOWCouplingBlock, PermuteRandom); medians of {repeats} chunks of "
                f"{chunk} steps; NLL per dim after {steps} steps at lr {LR}",
        "ours_path": main["ours_path"],
        "ours_median_s": main["ours_median_s"],
        "baseline_median_s": main["baseline_median_s"],
        "ratio": main["ratio"],
        "speedup": main["speedup"],
        "eager_speedup": main["eager_speedup"],
        "steps_per_s": {k: v["steps_per_s"] for k, v in configs.items()},
        "nll_after_steps": {k: v["nll_after_steps"] for k, v in configs.items()},
        "configs": configs,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed chunks per flow (default 5)")
    parser.add_argument("--chunk", type=positive_int, default=20, help="training steps per timed chunk")
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps for the NLL comparison")
    parser.add_argument("--blocks", type=positive_int, nargs="+", default=list(BLOCKS),
                        help=f"flow depths to compare, the first one reported (default {' '.join(map(str, BLOCKS))})")
    args = parser.parse_args(argv)
    torch.set_num_threads(threads())
    result = bench_flow_step_vs_freia(args.repeats, args.chunk, args.steps, tuple(args.blocks))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
