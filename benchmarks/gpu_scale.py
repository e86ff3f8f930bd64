"""Factorize a LLaMA-3-8B-shaped checkpoint on a GPU: wall time, peak GPU memory, peak host RSS.

Run on the machine with the GPU (it has no network: write the checkpoint there):

    python benchmarks/synthetic_llama.py --shape llama-3-8b --shard-size 5GB -o /tmp/synth-8b
    python examples/sample_text.py sample
    python benchmarks/gpu_scale.py /tmp/synth-8b --calib sample/calib.txt
    python benchmarks/gpu_scale.py /tmp/synth-8b --calib sample/calib.txt --memory-fraction 0.08

Each run factorizes in this process (``compressor.api.factorize``, streamed, ``--device cuda``)
with 64 windows of 512 at ``--target 0.8``; ``--memory-fraction`` caps the process's GPU memory
(``torch.cuda.set_per_process_memory_fraction``) below the model's size, to show that only a
block at a time needs to fit. One JSON record per run is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", required=True, help="a text file with enough tokens for the windows")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--memory-fraction", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_scale.json"))
    args = ap.parse_args(argv)

    import torch

    from compressor import api
    from compressor.options import CalibrationOptions, FactorizeOptions

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    if args.memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    checkpoint_bytes = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.model.parent) as scratch:
        result = api.factorize(
            str(args.model), FactorizeOptions(args.target), CalibrationOptions(args.calib, args.calib_samples, args.seq_len),
            output=Path(scratch) / "out", device="cuda",
        )
    seconds = time.perf_counter() - start
    record = {
        "model": str(args.model),
        "checkpoint_bytes": checkpoint_bytes,
        "target": args.target,
        "windows": [args.calib_samples, args.seq_len],
        "memory_fraction": args.memory_fraction,
        "seconds": round(seconds, 1),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(),
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "kept_fraction": result.outcome.plan.kept_fraction,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "host": platform.node(),
    }
    print(json.dumps(record, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*records, record], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
