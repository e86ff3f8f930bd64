"""End-to-end time and peak memory of `compress factorize` (load, calibrate, factor, save).

    python benchmarks/factorize_speed.py [--target 0.8] [--calib-samples 64] [--extra=--one-shot]

Runs the real CLI in a child process and reports its wall time and peak resident memory
(from the kernel's rusage), next to the size of the float32 model's parameters.
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
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    result = json.loads(report.read_text())
    model_gb = result["model_params_before"] * 4 / 1e9
    print(json.dumps({
        "wall_seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_gb, 3),
        "float32_model_gb": round(model_gb, 3),
        "peak_over_model": round(peak_gb * 1024**3 / 1e9 / model_gb, 2),
        "kept_fraction": result["kept_fraction"],
        "file_mb": round(result["file_bytes"] / 1e6, 1),
    }, indent=2))
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
