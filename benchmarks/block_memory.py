"""Where a streamed factorize peaks: the first blocks' pass 1 (`decompose_all`, as factorize calls
it), the resident set sampled every 20 ms, printed with the stack at its highest.

    python benchmarks/synthetic_llama.py --shape llama-3.2-1b -o /tmp/synth-1b
    python benchmarks/block_memory.py /tmp/synth-1b [--blocks 3]

Streams the checkpoint whatever its size, calibrates on 16 windows of 512 of WikiText-2
validation, runs in bfloat16 autocast with the Fisher output scales replaced by random positive
ones (the pass's shape, without the Fisher pass before it) and the decompositions spilled to a
temporary folder, as factorize does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--blocks", type=int, default=3)
    args = ap.parse_args()
    os.environ["COMPRESS_STREAM_MIN_BYTES"] = "0"
    from compressor.residency import Spill, bound_kernel_caches

    bound_kernel_caches()
    import psutil
    import torch

    from compressor import api
    from compressor.factorize import decompose_all
    from compressor.loading import load_model
    from compressor.options import CalibrationOptions
    from compressor.targets import select_targets

    process = psutil.Process()
    peak = {"rss": 0, "stack": ""}
    main_thread = threading.main_thread()

    def sample() -> None:
        while True:
            rss = process.memory_info().rss
            if rss > peak["rss"]:
                peak["rss"] = rss
                peak["stack"] = "".join(traceback.format_stack(sys._current_frames()[main_thread.ident])[-4:])
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    loaded = load_model(str(args.model), streamed_to=torch.device("cpu"))
    calibration = api.calibrate(loaded, CalibrationOptions(str(DATA / "wikitext2-valid.txt"), 16, 512))
    targets = [t for t in select_targets(loaded.model) if t.block_index < args.blocks]
    scales = {t.name: torch.rand(t.shape[0], dtype=torch.float64) + 0.5 for t in targets}
    print(f"before the loop: {process.memory_info().rss / 1e9:.3f} GB")
    peak["rss"] = 0
    with tempfile.TemporaryDirectory(dir=args.model.parent) as folder:
        decompose_all(loaded.model, targets, calibration, scales, False, torch.bfloat16, Spill(folder))
    print(f"peak in the loop: {peak['rss'] / 1e9:.3f} GB, at\n{peak['stack']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
