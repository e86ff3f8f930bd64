"""Wall time of `compress compensate` against `compress eval` over the same number of tokens.

    python benchmarks/compensate_speed.py [--rank 64] [--samples 64] [--repeats 1]

Both commands run end to end as a user runs them (process start, loading, the work), side by
side on the same machine: `compress quantize` writes an RTN w4 g128 checkpoint of SmolLM2 once,
then `compress compensate smollm2-135m Q --rank R --calib wikitext2-valid.txt` (N windows of 512)
and `compress eval Q --data wikitext2-valid.txt --max-windows N` (the same N×512 tokens)
alternate. The goal: compensation within 1.5x the evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compensate-args", nargs="*", default=[], help="extra flags for compress compensate")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    compress = str(Path(sys.executable).with_name("compress"))
    calib = str(DATA / "wikitext2-valid.txt")
    work = Path(tempfile.mkdtemp(prefix="compensate-speed-"))
    try:
        quantized = work / "q4"
        subprocess.run([compress, "quantize", args.model, "--bits", "4", "--group-size", "128", "--method", "rtn", "-o", str(quantized)],
                       check=True, stdout=subprocess.DEVNULL)
        rows = []
        for _ in range(args.repeats):
            adapter = work / "adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            compensate = timed([compress, "compensate", args.model, str(quantized), "--rank", str(args.rank), "--calib", calib,
                                "--calib-samples", str(args.samples), "-o", str(adapter), *args.compensate_args])
            evaluate = timed([compress, "eval", str(quantized), "--data", calib, "--max-windows", str(args.samples)])
            rows.append({"compensate_s": round(compensate, 1), "eval_s": round(evaluate, 1), "ratio": round(compensate / evaluate, 2)})
            print(json.dumps(rows[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps({"rank": args.rank, "samples": args.samples, "runs": rows}, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
