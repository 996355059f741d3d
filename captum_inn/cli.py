"""The command line: ``captum-inn demo``, ``captum-inn selfcheck`` (also ``python -m captum_inn``)."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from typing import List, Optional

from captum_inn._version import __version__

__all__ = ["main", "selfcheck"]

_DEFAULT_OUT = "captum_inn_report"
_DEFAULT_PHOTO_OUT = "captum_inn_photo_report"


def selfcheck(verbose: bool = True) -> bool:
    """Check the installation in a few seconds: capture a layer, round-trip a conditional INN.

    Args:
        verbose: Print one line per check.

    Returns:
        ``True`` when every check passed (otherwise an exception says what failed).

    Examples::

        >>> selfcheck(verbose=False)
        True
    """
    from captum_inn._random import seeded_global_rng

    with seeded_global_rng(0):  # the layers' initialisation draws; the caller's stream is left as it was
        return _selfcheck(verbose)


def _selfcheck(verbose: bool) -> bool:
    import torch
    from torch import nn

    from captum_inn.capture import capture
    from captum_inn.inn import ConditionalINN

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    say(f"captum_inn {__version__}  torch {torch.__version__}  python {sys.version.split()[0]}")
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 64, 10))
    x = torch.rand(4, 3, 8, 8, generator=gen)
    z = capture(model, "0", x)
    expected = model[0](x)
    if not torch.allclose(z, expected):
        raise RuntimeError("selfcheck: captured activation differs from a manual forward pass")
    say(f"  capture 'conv before in-place ReLU': {tuple(z.shape)}  ok")
    t = ConditionalINN(16, tuple(z.shape[1:]), n_blocks=4, hidden=64, embed_dim=32)
    code = torch.randn(4, 16, generator=gen)
    with torch.no_grad():
        v, logdet = t(code, z)
        back, _ = t(v, z, rev=True)
    err = float((back - code).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"selfcheck: conditional INN round trip error {err:.2e}")
    say(f"  conditional INN round trip: max error {err:.1e}  ok")
    return True


def _whole_number(text: str, least: int, most: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    if value > most:
        raise argparse.ArgumentTypeError(f"must be <= {most}, got {value}")
    return value


def _threads(text: str) -> int:
    """An argparse type: a whole number >= 1 that torch.set_num_threads takes (a C int; more overflowed
    with a traceback). argparse names the option in its error."""
    return _whole_number(text, 1, 2**31 - 1)


def _seed(text: str) -> int:
    """An argparse type: a whole number >= 0 (ColorDigits and NumPy's generators refuse negative seeds)
    and at most 2**52: the fits take seeds below 2**53 (they derive more from them), and the demos
    add small offsets (as :func:`captum_inn.demo.check_report_arguments` checks for Python callers)."""
    return _whole_number(text, 0, 2**52)


def _folder(text: str) -> str:
    """An argparse type: a non-empty path (an empty one, as an unset shell variable gives, meant the
    current folder: the report went there and replaced its index.html)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty path")
    return text


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-inn",
        description="Invertible interpretation networks for Captum: what a layer is invariant to.",
    )
    parser.add_argument("--version", action="version", version=f"captum_inn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,selfcheck}")
    demo = sub.add_parser(
        "demo", help="train a CNN on ColorDigits (or a ResNet-18 on your photos, --images), fit INNs, write a report",
        description="Train a CNN on ColorDigits (or, with --images, a ResNet-18 on a folder of photos), fit INNs "
                    "to its layers and write a report folder: index.html (open it in a browser), metrics.json, "
                    "figures/ and checkpoints/. A rerun into the same folder replaces its report; a folder "
                    "holding other files is refused. Exit status: 0, 1 with --check when a bound is missed, 2 "
                    "for a usage error, 130 when interrupted.")
    demo.add_argument("--out", type=_folder, default=None,
                      help=f"report folder (default: {_DEFAULT_OUT}; {_DEFAULT_PHOTO_OUT} with --images)")
    demo.add_argument("--quick", action="store_true", help="small settings for a smoke test (about 4 minutes on 2 cores)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of everything, 0 to 2**52 (default: %(default)s)")
    demo.add_argument("--threads", type=_threads, default=None, help="torch threads (default: torch's choice)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    demo.add_argument("--concepts", action="store_true",
                      help="add the concepts section: factor sizes, concept swaps, encoded shares, attributions "
                           "and training dynamics (about 7 minutes more on 2 CPU cores; not with --images)")
    demo.add_argument("--images", metavar="PATH", type=_folder, default=None,
                      help="run the photo demo instead: a folder with one sub-folder of images per class "
                           "(ImageFolder layout); ResNet-18, Grad-CAM, IG and invariances (about 17 minutes on 2 cores "
                           "for ~900 photos)")
    demo.add_argument("--check", action="store_true",
                      help="exit with status 1 unless the metrics meet the demo's bounds (their own, mostly looser, with --quick)")
    demo.set_defaults(command_parser=demo)  # for errors argparse cannot see: two options together, unknown ones
    check = sub.add_parser("selfcheck", help="check the installation in a few seconds")
    check.set_defaults(command_parser=check)
    return parser


# the demo functions' argument names, as the command line spells them
_FLAGS = {"`out`": "--out", "`images`": "--images", "`device`": "--device", "`seed`": "--seed",
          "device='cpu'": "--device cpu"}


def _usage_error(error: Exception) -> int:
    """Print ``error`` as a usage error of ``captum-inn demo``, with the flags for the argument names."""
    message = str(error)
    for name, flag in _FLAGS.items():
        message = message.replace(name, flag)
    print(f"captum-inn demo: error: {message}", file=sys.stderr)
    return 2


def _unknown_arguments(args: argparse.Namespace, unknown: List[str]) -> None:
    """Exit with status 2 naming ``unknown`` through the subcommand's own parser (its usage line), with
    the closest option it takes."""
    command = args.command_parser
    options = [o for action in command._actions for o in action.option_strings]
    hints = []
    for argument in unknown:
        close = difflib.get_close_matches(argument.split("=")[0], options, n=1, cutoff=0.7)
        hints.append(f"{argument} (did you mean {close[0]}?)" if close and argument.startswith("-") else argument)
    command.error(f"unrecognized arguments: {' '.join(hints)}; see captum-inn {args.command} --help")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit code.

    Examples::

        main(["selfcheck"])                    # 0, as `captum-inn selfcheck` in a shell
        main(["demo", "--quick", "--check"])   # 1 if a bound of the quick demo is missed, else 0
    """
    args, unknown = _build_parser().parse_known_args(argv)
    if unknown:  # named by the subcommand's parser, with its usage line and a close match, not the top level's
        _unknown_arguments(args, unknown)
    if args.command == "selfcheck":
        selfcheck()
        return 0
    if args.command == "demo":
        if args.images is not None and args.concepts:  # exits with status 2, as argparse's own errors
            args.command_parser.error("--concepts applies to the ColorDigits demo; the photo demo (--images) has no "
                             "concepts section")
        out = args.out
        if out is None:  # the default depends on the demo; an --out given is always taken
            out = _DEFAULT_OUT if args.images is None else _DEFAULT_PHOTO_OUT

        import torch

        from captum_inn.demo import check_report_arguments

        try:  # before any work: a usage error, not a traceback
            check_report_arguments(out, args.device, args.images)  # with the photos' layout (no photo is read)
        except ValueError as error:
            return _usage_error(error)
        threads = torch.get_num_threads()
        if args.threads:
            torch.set_num_threads(args.threads)
        start = time.perf_counter()
        from captum_inn.datasets import PhotoReadError

        try:
            if args.images is not None:
                from captum_inn.photo_demo import run_photo_demo

                report = run_photo_demo(args.images, out=out, quick=args.quick, seed=args.seed, device=args.device)
            else:
                from captum_inn.demo import run_demo

                report = run_demo(out=out, quick=args.quick, seed=args.seed, device=args.device,
                                  concepts=args.concepts)
        except PhotoReadError as error:  # found loading the photos, before the earlier report was replaced
            return _usage_error(error)
        except KeyboardInterrupt:  # the fit's "run the same call again to resume" is not what a rerun does here
            again = ("reuses its ResNet and continues its autoencoder where their settings match" if args.images
                     else "starts afresh")
            print(f"\ncaptum-inn demo: interrupted; {out}/ holds no finished report. Run the same command again "
                  f"(the {'photo' if args.images else 'ColorDigits'} demo {again}).", file=sys.stderr)
            return 130
        finally:  # main() called from Python (a notebook, a test) leaves the caller's thread count
            torch.set_num_threads(threads)
        print(f"report written to {report} in {time.perf_counter() - start:.0f} s (open it in a browser)")
        failures = json.loads((report.parent / "metrics.json").read_text(encoding="utf-8"))["failures"]
        for failure in failures:
            print(f"  bound not met: {failure}")
        if not failures:
            print("  every bound of the demo holds")
        return 1 if (failures and args.check) else 0
    raise AssertionError(args.command)  # argparse rejects unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
