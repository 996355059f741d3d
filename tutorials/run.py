"""Execute the tutorial notebooks top to bottom and report how long each took.

    python tutorials/run.py --ci              # CI: small settings, outputs kept in tutorial_runs/
    python tutorials/run.py --inplace         # full settings, outputs written into the notebooks
    python tutorials/run.py --ci 01_what_does_my_cnn_ignore.ipynb
    python tutorials/run.py --ci --jobs 2      # two notebooks at a time, the cores shared between them

Each notebook reads ``CAPTUM_INN_TUTORIAL_SETTINGS`` (``ci`` or ``full``) in its first code cell
and shrinks its step counts under ``ci``; the code path is the same. The photo tutorial reads its
ImageFolder from ``CAPTUM_INN_IMAGES`` (default: ``../shared/data/animalfaces10`` beside the
repository); without one it is skipped with a message, since the package never needs that folder.
A notebook that raises, or runs past ``--limit`` seconds, fails the run (exit status 1); with
``--inplace`` such a notebook keeps its committed outputs and the partial run goes to ``--out``.

``--jobs N`` runs N notebooks at a time, each kernel with the CPU cores shared out among them
(``OMP_NUM_THREADS``). The CI settings train small models, whose steps gain little from a second
thread, so two notebooks side by side on 2 cores finish sooner than one after the other.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Tutorials that need an ImageFolder of photos (``CAPTUM_INN_IMAGES``).
NEEDS_IMAGES = {"03_gradcam_ig_and_invariances_on_photos.ipynb"}


def _image_folder() -> Path | None:
    """The photo folder: ``CAPTUM_INN_IMAGES`` (a ``ValueError`` if that is not a folder), else the shared
    one beside the repository where it exists, else ``None``."""
    given = os.environ.get("CAPTUM_INN_IMAGES")
    if given and not Path(given).is_dir():  # a typo was taken for "unset": the tutorial was skipped
        raise ValueError(f"CAPTUM_INN_IMAGES is {given!r}, which is not a folder; point it at an ImageFolder of "
                         "photos, or unset it")
    folder = Path(given) if given else HERE.parent.parent / "shared" / "data" / "animalfaces10"
    return folder.resolve() if folder.is_dir() else None


def _seconds(text: str) -> float:
    """``--limit``: a finite number of seconds, at least 1 (nbclient reads 0 or less as no limit)."""
    value = float(text)
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 1, got {text!r}")
    return value


def run_notebook(path: Path, settings: str, out: Path, limit: float, failed_out: Path | None = None) -> float:
    """Execute ``path`` in a fresh kernel with ``settings``; return seconds.

    The executed copy goes to ``out``, or to ``failed_out`` (default ``out``) when a cell raises or
    times out, or the whole notebook runs past ``limit`` (a ``TimeoutError``), so that a failed
    ``--inplace`` run never overwrites a notebook's committed outputs.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    os.environ["CAPTUM_INN_TUTORIAL_SETTINGS"] = settings
    client = NotebookClient(notebook, timeout=math.ceil(limit), kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    target = failed_out or out
    try:
        client.execute()
        # nbclient bounds each cell; this bounds the whole notebook, before its outputs are kept
        if time.perf_counter() - start <= limit:
            target = out
    finally:
        seconds = time.perf_counter() - start
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, target)
    if seconds > limit:
        raise TimeoutError(f"ran {seconds:.0f} s, over the limit of {limit:.0f} s")
    return seconds


def _run_one(path: Path, settings: str, out: Path, limit: float, failed_out: Path, threads: int | None
                   ) -> tuple[float | None, str | None]:
    """:func:`run_notebook`, in this process or a worker, with kernels that use ``threads`` torch threads
    (``None``: torch's default): ``(seconds, None)``, or ``(None, error text)`` (an error may not pickle)."""
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)  # the kernel inherits them
    sys.stdout.write(f"run  {path.name} ({settings} settings)\n")  # one write: workers print side by side
    sys.stdout.flush()
    try:
        return run_notebook(path, settings, out, limit, failed_out), None
    except Exception as error:  # noqa: BLE001 - reported by the parent with the others
        return None, f"{type(error).__name__}: {str(error)[-2000:]}"


def report(runs: list[tuple[Path, Path]], results, args: argparse.Namespace, failures: list[str],
           times: dict[str, float]) -> None:
    """Print each notebook's outcome as its result arrives (in the order of ``runs``), collecting
    failures (an error, or a run past ``args.limit``) and the times of the others."""
    for (path, target), (seconds, error) in zip(runs, results):
        if error is not None:
            kept = f" (the notebook keeps its outputs; the partial run is in {args.out / path.name})" if args.inplace else ""
            failures.append(f"{path.name}: {error}{kept}")
            print(f"FAIL {path.name}\n{failures[-1]}", flush=True)
            continue
        times[path.name] = seconds
        print(f"ok   {path.name} in {seconds:.0f} s -> {target}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: every tutorial)")
    parser.add_argument("--ci", action="store_true", help="small settings (the CI run)")
    parser.add_argument("--inplace", action="store_true",
                        help="write the outputs into the notebooks themselves (for committing a full run)")
    parser.add_argument("--limit", type=_seconds, default=None,
                        help="seconds a notebook may take (default 600 with --ci, 3600 with full settings, "
                             "which take up to about 31 minutes on a 2-core AVX2-only CPU)")
    parser.add_argument("--out", type=Path, default=Path("tutorial_runs"),
                        help="folder for the executed copies when not --inplace (default tutorial_runs/)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks run at a time, the CPU cores shared out among them (default 1)")
    args = parser.parse_args(argv)
    if args.limit is None:
        args.limit = 600.0 if args.ci else 3600.0
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")

    names = args.notebooks or sorted(p.name for p in HERE.glob("*.ipynb"))
    try:
        images = _image_folder()
    except ValueError as error:
        parser.error(str(error))
    if images is not None:
        os.environ["CAPTUM_INN_IMAGES"] = str(images)
    failures, times, runs = [], {}, []
    for name in names:
        path = HERE / Path(name).name
        if not path.is_file():
            parser.error(f"no tutorial named {name!r} in {HERE}; choose from "
                         f"{', '.join(sorted(p.name for p in HERE.glob('*.ipynb')))}")
        if path.name in NEEDS_IMAGES and images is None:
            print(f"skip {path.name}: set CAPTUM_INN_IMAGES to an ImageFolder of photos", flush=True)
            continue
        runs.append((path, path if args.inplace else args.out / path.name))
    settings = "ci" if args.ci else "full"
    if args.jobs == 1:  # in this process, one after the other (Ctrl-C stops at once)
        report(runs, (_run_one(path, settings, target, args.limit, args.out / path.name, None)
                      for path, target in runs), args, failures, times)
    else:
        # each notebook in a worker process, whose kernel inherits the worker's thread count
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // min(args.jobs, max(1, len(runs))))
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            pending = [pool.submit(_run_one, path, settings, target, args.limit, args.out / path.name, threads)
                       for path, target in runs]
            try:
                report(runs, (future.result() for future in pending), args, failures, times)
            except BaseException:  # Ctrl-C, or a worker that died: do not start the queued notebooks
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    for name, seconds in times.items():
        print(f"{seconds:7.0f} s  {name}")
    if failures:
        print(f"{len(failures)} tutorial(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
