"""End-to-end time and peak memory of `compress factorize` (load, calibrate, factor, save).

    python benchmarks/factorize_speed.py [--target 0.8] [--calib-samples 64] [--extra=--one-shot]

Runs the real CLI in a child process and reports its wall time and peak resident memory
(from the kernel's rusage) in GiB, next to the size of the float32 model's parameters and the
ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from factorize_run import add_run_arguments, factorize_argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    args = parser.parse_args()
    compress = Path(sys.executable).with_name("compress")
    out = Path(tempfile.mkdtemp(prefix="factorize-speed-"))
    report = out / "report.json"
    command = [str(compress), *factorize_argv(args, out / "model"), "--json", str(report)]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    peak_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = json.loads(report.read_text())
    model_bytes = result["model_params_before"] * 4
    print(json.dumps({
        "wall_seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_bytes / 2**30, 3),
        "float32_model_gib": round(model_bytes / 2**30, 3),
        "peak_over_model": round(peak_bytes / model_bytes, 2),
        "kept_fraction": result["kept_fraction"],
        "file_mb": round(result["file_bytes"] / 1e6, 1),
    }, indent=2))
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
