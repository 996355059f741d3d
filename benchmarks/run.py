"""Benchmarks against real baselines, measured side by side in one run.

    python benchmarks/run.py                 # every comparison, 5 repeats, writes results.json
    python benchmarks/run.py --only invariance_vs_ig_small_cnn --repeats 7

Each comparison times ``ours`` and ``baseline`` alternately (so drifts of a shared machine hit both),
reports medians over the repeats and their ratio ``ours / baseline`` (lower is better for us),
and peak memory where it matters (measured in a fresh subprocess per method, as the growth of the
peak resident set over the set-up). Results go to ``benchmarks/results.json``; the README next to
this file records them with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from fitting import FITTING_COMPARISONS
from flow_vs_freia import bench_flow_step_vs_freia
from measure import alternate, peak_rss_mib, reset_peak, rss_mib, threads

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
    return dict(model=model.eval(), x=x, ae=ae, inn=inn.eval(), layer="fc", gradcam_layer=model.conv3)


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
    return dict(model=model, x=x, ae=ae, inn=inn.eval(), layer="layer4", gradcam_layer=model.layer4)


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
    """Peak RSS growth (MiB) of one call of ``method``, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--probe", setup, method], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    return float(out.stdout.strip().splitlines()[-1])


def _probe_main(setup: str, method: str) -> None:
    torch.set_num_threads(threads())
    s = SETUPS[setup]()
    fn = explanation_methods(s)[method]
    fn()  # warm-up: lazily created state (thread pools, captum's caches) is not the method's cost
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
    }


def bench_sampling(repeats: int) -> Dict[str, Any]:
    """Invariance samples per second: the INN alone (codes) and with the decoder (images)."""
    s = small_cnn_setup()
    inn, ae = s["inn"], s["ae"]
    n = 4096
    cond = torch.randn(n, 128)

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

    return {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "captum": captum.__version__,
        "captum_inn": captum_inn.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(COMPARISONS), help="run only these comparisons")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (default 5)")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--probe", nargs=2, metavar=("SETUP", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        _probe_main(*args.probe)
        return 0
    torch.set_num_threads(threads())
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["environment"] = environment()
    for name in args.only or list(COMPARISONS):
        print(f"running {name} ...", flush=True)
        results[name] = COMPARISONS[name](args.repeats)
        summary = {k: round(v, 4) for k, v in results[name].items() if isinstance(v, float)}
        print(f"  {summary}", flush=True)
        out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
