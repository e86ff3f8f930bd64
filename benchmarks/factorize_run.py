"""The `compress factorize` run that the speed and memory benchmarks measure, in one place.

SmolLM2 at --target 0.8, calibrated on 64 windows of WikiText-2 validation unless told otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", default="0.8")
    parser.add_argument("--calib", default=str(DATA / "wikitext2-valid.txt"))
    parser.add_argument("--calib-samples", default="64")
    parser.add_argument("--extra", action="append", default=[],
                        help="one more factorize flag, as --extra=--one-shot; repeat for more")


def factorize_argv(args: argparse.Namespace, output: Path) -> list[str]:
    """The CLI arguments after `compress`: factorize ``args.model`` into ``output``."""
    return ["factorize", args.model, "--target", args.target, "-o", str(output),
            "--calib", args.calib, "--calib-samples", args.calib_samples, *args.extra]
