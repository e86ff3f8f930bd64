"""Where the memory of `compress factorize` goes: resident and peak memory at each phase.

    python benchmarks/factorize_memory.py [--target 0.8] [--extra=--one-shot] [--trim]

Runs the real CLI in this process with probes around its phases (load, calibration,
output-Fisher pass, pass 1, sequential pass, writing): at each phase's start and end it
prints the resident set (VmRSS, in GiB), the run's peak so far and the peak since the phase began (VmHWM,
reset at each phase's start). ``--trim``
also returns freed heap memory to the system (glibc ``malloc_trim``) after each phase, to
tell memory still in use from memory the allocator keeps; the layer loop already does so
after every block.
"""

from __future__ import annotations

import argparse
import functools
import resource
import sys
import tempfile
import time
from pathlib import Path

from factorize_run import add_run_arguments, factorize_argv

START = time.perf_counter()


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def resident_gib() -> float:
    return _status_gib("VmRSS")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def phase_peak_gib() -> float:
    """The resident set's high-water mark since the last reset_phase_peak() (VmHWM)."""
    return _status_gib("VmHWM")


def reset_phase_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        pass


_highest = [0.0]  # resetting VmHWM also resets ru_maxrss, so the run's peak is kept here


def report(label: str) -> None:
    phase = phase_peak_gib()
    _highest[0] = max(_highest[0], phase, peak_gib())
    print(f"[{time.perf_counter() - START:6.1f} s] {label:<28} resident {resident_gib():.2f} GiB "
          f"(anonymous {_status_gib('RssAnon'):.2f}, files {_status_gib('RssFile'):.2f}), "
          f"peak {_highest[0]:.2f} GiB, peak in phase {phase:.2f} GiB", flush=True)


def probe(module, name: str, trim) -> None:
    inner = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        report(f"> {name}")
        reset_phase_peak()
        result = inner(*args, **kwargs)
        trim()
        report(f"< {name}")
        return result

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--trim", action="store_true",
                        help="malloc_trim (glibc) after each phase (the layer loop itself does so after each block)")
    args = parser.parse_args()

    import torch  # noqa: F401  (imports first: their memory is the floor)
    import transformers  # noqa: F401

    report("imports (torch, transformers)")

    import compressor.api as api
    import compressor.cli as cli
    import compressor.factorize as factorize
    import compressor.formats.factored as factored
    from compressor.residency import return_free_heap

    def trim() -> None:
        if args.trim:
            return_free_heap()

    probe(cli, "_load", trim)
    probe(api, "calibrate", trim)
    probe(factorize, "output_fisher", trim)
    probe(factorize, "decompose_all", trim)
    probe(factorize, "factor_targets", trim)
    probe(factored, "save_factored", trim)
    with tempfile.TemporaryDirectory(prefix="factorize-memory-") as out:
        code = cli.run(factorize_argv(args, Path(out) / "model"))
    report("end")
    sys.exit(code)


if __name__ == "__main__":
    main()
