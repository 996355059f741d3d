"""Where the time of a short INN fit goes on a GPU when its steps are captured as CUDA graphs: the
features pass, the eager warm-up steps, the capture itself and the replays, for layer4 alone and for
layer1-layer4 side by side (``multi_layer_vs_single``'s ResNet-18 setting), at the benchmark's 40
steps per layer and at longer fits. Not part of ``run.py``; results are in ``benchmarks/README.md``.

    python benchmarks/capture_overhead_probe.py OUT.json --device cuda [--steps 40 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fitting import INN, fit_setup  # noqa: E402
from measure import positive_int, synchronize  # noqa: E402

import captum_inn.training.invariances as invariances  # noqa: E402
from captum_inn.training import cache_features, fit_invariances  # noqa: E402
from captum_inn.training.loop import CapturedStep  # noqa: E402

_events: list = []  # (thread, what, start, end) of every fit and capture in the current call
_lock = threading.Lock()


def _record(what: str, start: float, end: float = None) -> None:
    with _lock:
        _events.append((threading.get_ident(), what, start, time.perf_counter() if end is None else end))


def _timed_train_loop(original):
    def train_loop(module, loss_fn, **kwargs):
        start, seen = time.perf_counter(), {}
        callback = kwargs.get("callback")

        def after_step(step, trained):
            if step == CapturedStep.WARMUP_STEPS:
                seen["warm_up_end"] = time.perf_counter()
            if callback is not None:
                callback(step, trained)
        kwargs["callback"] = after_step
        history = original(module, loss_fn, **kwargs)
        _record("fit", start)
        if "warm_up_end" in seen:
            _record("warm_up", start, seen["warm_up_end"])
        return history
    return train_loop


def _timed_capture(original):
    def init(self, *args, **kwargs):
        start = time.perf_counter()
        original(self, *args, **kwargs)
        _record("capture", start)
    return init


def phases(fn):
    """Wall time of ``fn()`` and, summed over its fits, the warm-up, capture and fit seconds."""
    _events.clear()
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    wall = time.perf_counter() - start
    total = {what: sum(e[3] - e[2] for e in _events if e[1] == what) for what in ("fit", "warm_up", "capture")}
    first, last = min((e[2] for e in _events), default=start), max((e[3] for e in _events), default=start)
    return {"wall_s": wall, "before_first_fit_s": first - start, "fits_span_s": last - first,
            "fit_s_summed": total["fit"], "warm_up_s_summed": total["warm_up"], "capture_s_summed": total["capture"],
            "fits": sum(e[1] == "fit" for e in _events), "captures": sum(e[1] == "capture" for e in _events)}


def fit(model, layers, ae, images, steps, dev):
    return lambda: fit_invariances(model, layers, ae, images, steps=steps, progress=False, device=dev, **INN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[40, 400])
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    os.environ["BENCH_DEVICE"] = args.device  # read by measure.device() and fit_setup
    invariances.train_loop = _timed_train_loop(invariances.train_loop)
    CapturedStep.__init__ = _timed_capture(CapturedStep.__init__)

    s = fit_setup("resnet18")
    model, ae, images, dev = s["model"], s["ae"], s["images"], torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
               "setting": f"{s['label']}, {images.shape[0]} images, INN {INN}", "warm_up_steps": CapturedStep.WARMUP_STEPS}
    passes = {"one_layer": lambda: cache_features(model, s["layer"], ae, images, progress=False, device=dev),
              "four_layers": lambda: cache_features(model, s["layers"], ae, images, progress=False, device=dev)}
    passes["one_layer"]()  # warm-up: cuDNN's set-up
    results["features_pass_s"] = {name: statistics.median(phases(fn)["wall_s"] for _ in range(args.repeats))
                                  for name, fn in passes.items()}
    for steps in args.steps:
        fits = {"one_layer": fit(model, s["layer"], ae, images, steps, dev),
                "four_layers": fit(model, s["layers"], ae, images, steps, dev)}
        for fn in fits.values():
            fn()  # warm-up
        runs = {name: [phases(fn) for _ in range(args.repeats)] for name, fn in fits.items()}
        summary = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
        summary["ratio_four_to_one"] = summary["four_layers"]["wall_s"] / summary["one_layer"]["wall_s"]
        results[f"{steps}_steps"] = summary
        print(steps, "steps:", json.dumps(summary), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
