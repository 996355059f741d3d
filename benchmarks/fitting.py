"""Fitting benchmarks: the feature cache against recomputation, one pass for several layers,
memory as the dataset grows (cache on disk), and two processes against one (torchrun)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from measure import (
    alternate,
    device,
    peak_rss_mib,
    reset_peak,
    rss_mib,
    run_child,
    summarise,
    threads,
)

INN = dict(n_blocks=8, hidden=256, embed_dim=128, batch_size=128)
EPOCHS = 5


def fit_setup(name: str) -> Dict[str, Any]:
    """The analysed network and its autoencoder (on the benchmark's device) and training images
    (on the CPU, as a user's dataset is) of one benchmark setting."""
    from captum_inn.autoencoders import ConvAutoencoder

    torch.manual_seed(0)
    if name == "small_cnn":
        from captum_inn.datasets import ColorDigits
        from captum_inn.models import SmallCNN

        model = SmallCNN(width=48).eval()
        images = ColorDigits("train", seed=0, recolorings=2).images[:2048]
        return dict(model=model.to(device()), ae=ConvAutoencoder((3, 32, 32), latent_dim=64, width=32).eval().to(device()),
                    images=images,
                    layer="fc", layers=["relu1", "relu3", "fc", "logits"], label="SmallCNN, ColorDigits 32×32")
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.rand(1024, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return dict(model=model.to(device()), ae=ConvAutoencoder((3, 64, 64), latent_dim=128, width=32).eval().to(device()),
                images=images,
                layer="layer4", layers=["layer1", "layer2", "layer3", "layer4"], label="ResNet-18, 64×64")


def _steps(n_images: int) -> int:
    return EPOCHS * n_images // INN["batch_size"]


def _cached_vs_recompute(name: str, repeats: int) -> Dict[str, Any]:
    from captum_inn.attr._common import layer_activation
    from captum_inn.autoencoders import encode_posterior
    from captum_inn.capture import resolve_layer
    from captum_inn.inn import ConditionalINN
    from captum_inn.training import InvarianceConfig, cache_features, fit_invariances

    s = fit_setup(name)
    model, ae, images, layer = s["model"], s["ae"], s["images"], s["layer"]
    steps, batch, dev = _steps(images.shape[0]), INN["batch_size"], device()
    module = resolve_layer(model, layer)[1]
    cond_shape = cache_features(model, layer, ae, images[:2], progress=False, device=dev).layer_shape(layer)
    latent = ae.latent_dim
    on_device = images.to(dev)  # the baseline's best case: its images wait on the device

    def cached() -> None:
        cache = cache_features(model, layer, ae, images, progress=False, device=dev)
        fit_invariances(model, layer, cache=cache, steps=steps, progress=False, device=dev, **INN)

    def recompute() -> None:  # the reference implementation's way: features computed inside every step
        # the architecture fit_invariances builds from the same settings (its embedder's widths, patches, tokens)
        config = InvarianceConfig(**INN)
        inn = ConditionalINN(latent, cond_shape, n_blocks=config.n_blocks, hidden=config.hidden, depth=config.depth,
                             embed_dim=config.embed_dim, clamp=config.clamp, conv_width=config.conv_width,
                             conv_max_width=config.conv_max_width, conv_patch_to=config.conv_patch_to,
                             token_dim=config.token_dim).to(dev)
        optimizer = torch.optim.Adam(inn.parameters(), lr=5e-4, foreach=True)  # as fit_invariances' optimiser
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            x = on_device[torch.randint(images.shape[0], (batch,), generator=generator).to(dev)]
            with torch.no_grad():
                z = layer_activation(model, module, (x,))
                mean, std = encode_posterior(ae, x)
            v, logdet = inn(mean + std * torch.randn(mean.shape, generator=generator).to(dev), z)
            loss = (0.5 * v.pow(2).sum(1) - logdet).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    times = alternate({"cached": cached, "recompute": recompute}, repeats, warm_up=dev.type != "cpu")
    ours, baseline = times["cached"]["median_s"], times["recompute"]["median_s"]
    return {"what": f"{s['label']}: fit_invariances at {layer}, {images.shape[0]} images, {EPOCHS} epochs "
                    f"({steps} steps of {batch}), cache built inside the timing",
            "ours_median_s": ours, "baseline_median_s": baseline, "ratio": ours / baseline,
            "speedup": baseline / ours, "times": times}


def bench_cached_vs_recompute(repeats: int) -> Dict[str, Any]:
    """Cached fitting vs recomputing the network and encoder every step, at 5 epochs, on two models.

    The top-level figures are ResNet-18's (a network whose pass costs more than an INN step, the
    case the cache is for); SmallCNN's are under ``small_cnn``.
    """
    resnet = _cached_vs_recompute("resnet18", repeats)
    small = _cached_vs_recompute("small_cnn", repeats)
    return {**resnet, "small_cnn": small}


def bench_multi_layer(repeats: int) -> Dict[str, Any]:
    """Fitting 4 layers from one pass vs fitting one layer (its pass plus its training)."""
    from captum_inn.training import fit_invariances

    s = fit_setup("resnet18")
    model, ae, images, dev = s["model"], s["ae"], s["images"], device()
    steps = _steps(images.shape[0])

    def fit(layers, workers=None):
        return lambda: fit_invariances(model, layers, ae, images, steps=steps, progress=False, workers=workers,
                                       device=dev, **INN)

    # the default trains the four INNs side by side (CPU: threads; CUDA: streams); one after
    # another is recorded beside it
    fits = {"four_layers": fit(s["layers"]), "one_layer": fit(s["layer"]),
            "four_layers_one_at_a_time": fit(s["layers"], workers=1)}
    times = alternate(fits, repeats, warm_up=dev.type != "cpu")  # on a GPU, the first call pays for cuDNN's set-up
    from captum_inn.training import cache_features

    start = time.perf_counter()
    cache_features(model, s["layers"], ae, images, progress=False, device=dev)
    pass_s = time.perf_counter() - start
    ours, baseline = times["four_layers"]["median_s"], times["one_layer"]["median_s"]
    return {"what": f"{s['label']}: fit_invariances for {s['layers']} from one pass vs for {s['layer']} alone, "
                    f"{images.shape[0]} images, {steps} steps per layer ({EPOCHS} epochs)",
            "ours_median_s": ours, "baseline_median_s": baseline, "ratio": ours / baseline,
            "ratio_one_at_a_time": times["four_layers_one_at_a_time"]["median_s"] / baseline,
            "network_pass_s": pass_s, "times": times}


# ------------------------------------------------------------ memory as the dataset grows
def _write_images(path: Path, n: int) -> None:
    from captum_inn.datasets import ColorDigits

    recolorings = -(-n // 1437)
    np.save(path, ColorDigits("train", seed=0, recolorings=recolorings).images[:n].numpy())


def _memory_probe_main(images_path: str, mode: str) -> None:
    """In a fresh process: the peak RSS growth of one fit_invariances call over the set-up."""
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.models import SmallCNN
    from captum_inn.training import fit_invariances
    from captum_inn.training.disk import DiskArray

    torch.set_num_threads(threads())
    torch.manual_seed(0)
    dev = device()
    model, ae = SmallCNN(width=48).eval().to(dev), ConvAutoencoder((3, 32, 32), latent_dim=64, width=32).eval().to(dev)
    images = DiskArray(images_path)  # read on demand: the dataset is not in memory either
    settings = dict(steps=100, progress=False, device=dev, **INN)
    with tempfile.TemporaryDirectory() as warm:  # warm-up on a few images: thread pools, allocator
        fit_invariances(model, ["relu3", "fc"], ae, images[:256], memmap=True, checkpoint_dir=warm, **{**settings, "steps": 2})
    reset_peak()
    before = rss_mib()
    with tempfile.TemporaryDirectory() as folder:
        fit_invariances(model, ["relu3", "fc"], ae, images, memmap=(mode == "disk"), checkpoint_dir=folder, **settings)
    print(json.dumps({"growth_mib": peak_rss_mib() - before, "baseline_mib": before}))


def _probe(images_path: Path, mode: str) -> Dict[str, float]:
    return json.loads(run_child([sys.executable, __file__, "--memory-probe", str(images_path), mode]).strip().splitlines()[-1])


def bench_memory_growth(repeats: int) -> Dict[str, Any]:
    """Peak memory of fit_invariances (layers relu3 and fc) on N and 10·N images, cache on disk vs in memory."""
    sizes = (2000, 20000)
    result: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for n in sizes:
            _write_images(Path(folder) / f"images_{n}.npy", n)
        for mode in ("disk", "memory"):
            for n in sizes:
                runs = [_probe(Path(folder) / f"images_{n}.npy", mode) for _ in range(max(1, min(repeats, 3)))]
                result[f"{mode}_{n}"] = {"peak_growth_mib": statistics.median(r["growth_mib"] for r in runs),
                                         "process_before_mib": statistics.median(r["baseline_mib"] for r in runs),
                                         "runs": len(runs)}
    def peak(mode, n):  # the process's whole peak: what the machine must hold
        entry = result[f"{mode}_{n}"]
        return entry["process_before_mib"] + entry["peak_growth_mib"]

    ours, baseline = peak("disk", sizes[1]), peak("disk", sizes[0])
    return {"what": f"peak resident memory of fit_invariances (SmallCNN relu3+fc, images read from a .npy on disk, "
                    f"100 steps) on {sizes[0]} vs {sizes[1]} images, cache on disk (memmap=True); in-memory cache "
                    "for reference",
            "ours_median_s": None, "baseline_median_s": None,
            "peak_mib_10x": ours, "peak_mib_1x": baseline, "ratio": ours / baseline,
            "growth_percent": 100 * (ours / baseline - 1),
            "memory_cache_peak_mib": {n: peak("memory", n) for n in sizes}, "probes": result}


# ------------------------------------------------------------ torchrun: two processes vs one
def _ddp_run(n_processes: int, folder: Path) -> Dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_processes}",
               str(Path(__file__)), "--ddp-worker", str(folder)]
    start = time.perf_counter()
    run_child(command, OMP_NUM_THREADS=str(max(1, threads() // n_processes)),
              BENCH_THREADS=str(max(1, threads() // n_processes)))
    wall = time.perf_counter() - start
    return {"wall_s": wall, **json.loads((folder / "result.json").read_text())}


def _ddp_worker_main(folder: str) -> None:
    """Under torchrun: fit the INNs of SmallCNN's relu3 and fc on ColorDigits; rank 0 writes its timing."""
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.datasets import ColorDigits
    from captum_inn.models import SmallCNN
    from captum_inn.training import fit_invariances
    from captum_inn.training.distributed import world

    torch.set_num_threads(threads())
    torch.manual_seed(0)
    model, ae = SmallCNN(width=48).eval(), ConvAutoencoder((3, 32, 32), latent_dim=64, width=32).eval()
    images = ColorDigits("train", seed=0, recolorings=2).images[:2048]
    dev = device()
    if dev.type == "cuda":  # one GPU per process
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        model, ae = model.to(dev), ae.to(dev)
    start = time.perf_counter()
    inns = fit_invariances(model, ["relu3", "fc"], ae, images, steps=_steps(2048), progress=False, device=dev, **INN)
    elapsed = time.perf_counter() - start
    rank, size = world()
    if rank == 0:
        tail = {name: statistics.mean(inn.history[-20:]) for name, inn in inns.items()}
        (Path(folder) / "result.json").write_text(json.dumps({"fit_s": elapsed, "final_loss": tail, "world_size": size}))
    if size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        os._exit(0)  # torch 2.14 + gloo can abort in exit-time destructors (see tests/ddp_fit_script.py)


def bench_ddp(repeats: int) -> Dict[str, Any]:
    """fit_invariances under torchrun with 2 processes vs 1 (same total threads), time and final loss."""
    if device().type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"two processes need two GPUs (NCCL), this machine has {torch.cuda.device_count()}"}
    times: Dict[str, list] = {"two_processes": [], "one_process": []}
    losses: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats):
            for label, n in (("two_processes", 2), ("one_process", 1)):
                run = _ddp_run(n, Path(folder))
                times[label].append(run["fit_s"])
                losses[label] = run["final_loss"]
    summary = summarise(times)
    ours, baseline = summary["two_processes"]["median_s"], summary["one_process"]["median_s"]
    return {"what": f"fit_invariances (SmallCNN relu3+fc, 2048 ColorDigits images, {_steps(2048)} steps of "
                    f"{INN['batch_size']}) under torchrun, 2 processes × {max(1, threads() // 2)} threads vs 1 × "
                    f"{threads()}; time of the fit call (network pass and training) on rank 0",
            "ours_median_s": ours, "baseline_median_s": baseline, "ratio": ours / baseline,
            "speedup": baseline / ours, "final_loss": losses, "times": summary}


FITTING_COMPARISONS = {
    "cached_vs_recompute": bench_cached_vs_recompute,
    "multi_layer_vs_single": bench_multi_layer,
    "memory_growth_10x": bench_memory_growth,
    "ddp_2proc_vs_1proc": bench_ddp,
}

if __name__ == "__main__":
    if sys.argv[1] == "--memory-probe":
        _memory_probe_main(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "--ddp-worker":
        _ddp_worker_main(sys.argv[2])
