"""How the benchmarks measure: interleaved timing with medians, and peak resident memory."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, List

import torch


def device() -> torch.device:
    """Device of every measurement (``BENCH_DEVICE``, set by ``run.py --device``; default the CPU)."""
    return torch.device(os.environ.get("BENCH_DEVICE", "cpu"))


def synchronize() -> None:
    """Wait for queued GPU work, so a timer sees the work, not its launch."""
    if device().type == "cuda":
        torch.cuda.synchronize(device())


def timed(fn: Callable[[], Any]) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def alternate(fns: Dict[str, Callable[[], Any]], repeats: int, warm_up: bool = True) -> Dict[str, Dict[str, float]]:
    """Median and spread of each function's time, calls interleaved, after one warm-up call each."""
    if warm_up:
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return summarise(times)


def summarise(times: Dict[str, list]) -> Dict[str, Dict[str, float]]:
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": len(t)}
            for name, t in times.items()}


def rss_mib() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Reset the peak resident set (VmHWM) to the current one (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """Peak resident set size since the start or the last :func:`reset_peak`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak_gpu() -> float:
    """Reset the GPU's peak allocation to the current one and return the current one (MiB)."""
    synchronize()
    torch.cuda.reset_peak_memory_stats(device())
    return torch.cuda.memory_allocated(device()) / 2**20


def peak_gpu_mib() -> float:
    """Peak GPU memory allocated by PyTorch since the last :func:`reset_peak_gpu` (MiB)."""
    synchronize()
    return torch.cuda.max_memory_allocated(device()) / 2**20


def child_env(**extra: str) -> Dict[str, str]:
    """Environment of a measuring subprocess: this checkout first on ``PYTHONPATH``, the caller's
    entries (packages installed elsewhere) kept after it."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_child(command: List[str], **extra_env: str) -> str:
    """Run a measuring subprocess (in :func:`child_env`) and return its standard output; when it fails,
    a ``RuntimeError`` that carries the end of its error output (``check=True`` alone kept it hidden)."""
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(**extra_env))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with status {done.returncode}:\n"
                           f"{(done.stderr or done.stdout)[-2000:]}")
    return done.stdout


def threads() -> int:
    """Torch threads of every measurement (``BENCH_THREADS``, default: all cores)."""
    return int(os.environ.get("BENCH_THREADS", str(os.cpu_count() or 1)))


def positive_int(text: str) -> int:
    """An ``argparse`` type for counts (``--repeats``, ``--chunk``, ``--steps``): an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
