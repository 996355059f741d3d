"""Benchmarks against real baselines, measured side by side in one run.

    python benchmarks/run.py                 # every comparison, 5 repeats, writes results.json
    python benchmarks/run.py --only invariance_vs_ig_small_cnn --repeats 7
    python benchmarks/run.py --device cuda   # on a GPU; writes results_cuda.json

Each comparison times ``ours`` and ``baseline`` alternately (so drifts of a shared machine hit both),
reports medians over the repeats and their ratio ``ours / baseline`` (lower is better for us),
and peak memory where it matters (measured in a fresh subprocess per method, as the growth of the
peak resident set over the set-up; on a GPU, of PyTorch's peak GPU allocation). Results go to
``benchmarks/results.json`` (``results_cuda.json`` with ``--device cuda``); the README next to this
file records them with the machine and versions. A comparison that fails is recorded with its
error and the run goes on (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from fitting import FITTING_COMPARISONS
from flow_vs_freia import bench_flow_step_vs_freia
from measure import (
    alternate,
    device,
    peak_gpu_mib,
    peak_rss_mib,
    positive_int,
    reset_peak,
    reset_peak_gpu,
    rss_mib,
    run_child,
    threads,
)

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- set-ups (shared by timing and memory probes)
def small_cnn_setup() -> Dict[str, Any]:
    """SmallCNN on 64 ColorDigits images at 32×32; the invariance INN of its fc layer."""
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.datasets import ColorDigits
    from captum_inn.inn import ConditionalINN
    from captum_inn.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(width=48).eval()
    x = ColorDigits("test", seed=0).images[:64]
    ae = ConvAutoencoder((3, 32, 32), latent_dim=64, width=32).eval()
    inn = ConditionalINN(64, (128,), n_blocks=8, hidden=256, embed_dim=128)
    with torch.no_grad():
        inn(torch.randn(256, 64), torch.randn(256, 128))  # ActNorm initialisation; speed does not depend on training
    dev = device()
    return dict(model=model.to(dev), x=x.to(dev), ae=ae.to(dev), inn=inn.eval().to(dev), layer="fc",
                gradcam_layer=model.conv3)


def resnet18_setup() -> Dict[str, Any]:
    """torchvision ResNet-18 (10 classes, from scratch) on 64 images at 64×64; the INN of layer4."""
    import torchvision

    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.inn import ConditionalINN

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ae = ConvAutoencoder((3, 64, 64), latent_dim=128, width=32).eval()
    inn = ConditionalINN(128, (512, 2, 2), n_blocks=8, hidden=256, embed_dim=128, conv_width=64, conv_max_width=128)
    with torch.no_grad():
        inn(torch.randn(256, 128), torch.randn(256, 512, 2, 2))
    dev = device()
    return dict(model=model.to(dev), x=x.to(dev), ae=ae.to(dev), inn=inn.eval().to(dev), layer="layer4",
                gradcam_layer=model.layer4)


SETUPS = {"small_cnn": small_cnn_setup, "resnet18": resnet18_setup}


def explanation_methods(s: Dict[str, Any]) -> Dict[str, Callable[[], Any]]:
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    from captum_inn import LayerInvariance

    model, x = s["model"], s["x"]
    with torch.no_grad():
        target = model(x).argmax(1)
    invariance = LayerInvariance(model, s["layer"], s["inn"], s["ae"])
    ig = IntegratedGradients(model)
    gradcam = LayerGradCam(model, s["gradcam_layer"])
    return {
        "invariance_map_16": lambda: invariance.attribute(x, n_samples=16, internal_batch_size=256),
        "integrated_gradients_50": lambda: ig.attribute(x, target=target, n_steps=50, internal_batch_size=256),
        "gradcam": lambda: LayerAttribution.interpolate(gradcam.attribute(x, target=target), x.shape[2:]),
    }


# ---------------------------------------------------------------- memory probes
def memory_probe(setup: str, method: str) -> float:
    """Peak memory growth (MiB) of one call of ``method``, in a fresh process: resident set on the
    CPU, PyTorch's GPU allocation on a GPU."""
    return float(run_child([sys.executable, __file__, "--probe", setup, method]).strip().splitlines()[-1])


def _probe_main(setup: str, method: str) -> None:
    torch.set_num_threads(threads())
    s = SETUPS[setup]()
    fn = explanation_methods(s)[method]
    fn()  # warm-up: lazily created state (thread pools, captum's caches) is not the method's cost
    if device().type == "cuda":
        before = reset_peak_gpu()
        fn()
        print(peak_gpu_mib() - before)
        return
    reset_peak()
    before = rss_mib()
    fn()
    print(peak_rss_mib() - before)


# ---------------------------------------------------------------- comparisons
def bench_explanations(setup: str, repeats: int) -> Dict[str, Any]:
    s = SETUPS[setup]()
    times = alternate(explanation_methods(s), repeats)
    memory = {name: memory_probe(setup, name) for name in times}
    ours, baseline = times["invariance_map_16"]["median_s"], times["integrated_gradients_50"]["median_s"]
    return {
        "what": f"LayerInvariance.attribute (16 samples) vs IntegratedGradients (50 steps) and LayerGradCam, "
                f"{tuple(s['x'].shape)} batch, layer {s['layer']}",
        "ours_median_s": ours,
        "baseline_median_s": baseline,
        "ratio": ours / baseline,
        "gradcam_median_s": times["gradcam"]["median_s"],
        "times": times,
        "peak_memory_growth_mib": memory,
        "memory_measured": "GPU allocation" if device().type == "cuda" else "resident set",
    }


def bench_sampling(repeats: int) -> Dict[str, Any]:
    """Invariance samples per second: the INN alone (codes) and with the decoder (images)."""
    s = small_cnn_setup()
    inn, ae = s["inn"], s["ae"]
    n = 4096
    cond = torch.randn(n, 128).to(device())

    @torch.no_grad()
    def codes() -> None:
        inn.sample(cond)

    @torch.no_grad()
    def images() -> None:
        for part in range(0, n, 512):
            ae.decode(inn.sample(cond[part:part + 512]))

    times = alternate({"inn": codes, "inn_and_decoder": images}, repeats)
    return {
        "what": f"{n} invariance samples (8 blocks, width 256, 64-d code, 128-d fc condition; 32×32 decoder)",
        "samples_per_s_inn": n / times["inn"]["median_s"],
        "samples_per_s_with_decoder": n / times["inn_and_decoder"]["median_s"],
        "times": times,
    }


COMPARISONS = {
    "invariance_vs_ig_small_cnn": lambda r: bench_explanations("small_cnn", r),
    "invariance_vs_ig_resnet18": lambda r: bench_explanations("resnet18", r),
    "sampling_throughput": bench_sampling,
    "flow_step_vs_freia": bench_flow_step_vs_freia,
    **FITTING_COMPARISONS,
}


def environment() -> Dict[str, Any]:
    import captum

    import captum_inn
    from captum_inn.inn._fast import fast_path_enabled
    from captum_inn.training.loop import cuda_graphs_by_default

    dev = device()
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        # the vector instructions torch's CPU kernels use (AVX2, AVX512): ratios move with them
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_subnets": fast_path_enabled(),  # which path the coupling subnets took
        "cuda_graphs": cuda_graphs_by_default(),  # whether fits on CUDA captured their steps
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "captum": captum.__version__,
        "captum_inn": captum_inn.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(COMPARISONS), help="run only these comparisons")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs per method (default 5)")
    parser.add_argument("--device", default="cpu", help="torch device of every measurement, e.g. cuda (default cpu)")
    parser.add_argument("--out", help="results file (default results.json, or results_cuda.json on a GPU)")
    parser.add_argument("--probe", nargs=2, metavar=("SETUP", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        _probe_main(*args.probe)
        return 0
    from captum_inn.attr._common import as_device

    try:
        dev = as_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    out = Path(args.out or HERE / ("results.json" if dev.type == "cpu" else f"results_{dev.type}.json"))
    if out.is_dir() or not out.parent.is_dir():  # found now, not after the first comparison's measurements
        parser.error(f"--out {str(out)!r}: give a file in an existing folder")
    os.environ["BENCH_DEVICE"] = str(dev)  # read by measure.device(), here and in the probes' processes
    torch.set_num_threads(threads())
    results = json.loads(out.read_text()) if out.exists() else {}
    results["environment"] = environment()
    failed = []
    for name in args.only or list(COMPARISONS):
        print(f"running {name} ...", flush=True)
        start = time.perf_counter()
        try:
            results[name] = COMPARISONS[name](args.repeats)
        except Exception as error:  # record it and go on: one broken comparison must not lose the others
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            failed.append(name)
        summary = {k: round(v, 4) for k, v in results[name].items() if isinstance(v, float)}
        print(f"  {summary} ({time.perf_counter() - start:.0f} s)", flush=True)
        out.write_text(json.dumps(results, indent=2))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
