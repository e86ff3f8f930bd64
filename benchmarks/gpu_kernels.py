"""The GPU run of issue 22, prepared as one script: kernels checked on real shapes, then timed.

    python3 benchmarks/gpu_kernels.py --out $OUT            # on the device machine, ~5 minutes

1. Correctness: the factored and corrected Triton kernels against a float64 reference on
   LLaMA-3-8B's shapes at kept 0.5 and 0.8 and rank 64, bfloat16 and float16, 1-64 tokens.
2. `compress bench` on those shapes (CUDA graphs, weights rotated past the L2 cache): dense
   cuBLAS, the Triton path, the two-matmul PyTorch path, dense + rank-64, the copy bandwidth, η.
3. Decode of an 8-layer LLaMA-3-8B-shaped model of random weights (written by
   `synthetic_llama.py` on that machine), dense against factored at 0.5, 1-64 tokens per step.
Each part's result is written to OUT as JSON as soon as it is made.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def check_kernels(out: Path) -> None:
    from compressor.bench import DEFAULT_SHAPES, parse_shapes
    from compressor.kernels import corrected_linear, lowrank_linear, use_kernels

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in parse_shapes(DEFAULT_SHAPES):
        for dtype in (torch.bfloat16, torch.float16):
            for tokens in (1, 4, 16, 64):
                m, n, r = shape.out, shape.inp, shape.rank
                x = torch.randn(tokens, n, device="cuda", generator=g)
                a = torch.randn(r, n, device="cuda", generator=g) / n**0.5
                b = torch.randn(m, r, device="cuda", generator=g) / r**0.5
                w = torch.randn(m, n, device="cuda", generator=g) / n**0.5
                a64, b64 = torch.randn(64, n, device="cuda", generator=g) / n**0.5, torch.randn(m, 64, device="cuda", generator=g) / 8
                x, a, b, w, a64, b64 = (t.to(dtype) for t in (x, a, b, w, a64, b64))
                with torch.inference_mode(), use_kernels("triton"):
                    y = lowrank_linear(x, a, b).double()
                    yc = corrected_linear(x, w, a64, b64).double()
                ref = (x.double() @ a.double().T) @ b.double().T
                refc = x.double() @ w.double().T + (x.double() @ a64.double().T) @ b64.double().T
                rows.append({"shape": str(shape), "dtype": str(dtype), "tokens": tokens,
                             "factored_rel_error": float((y - ref).abs().max() / ref.abs().max()),
                             "corrected_rel_error": float((yc - refc).abs().max() / refc.abs().max())})
    worst = max(max(r["factored_rel_error"], r["corrected_rel_error"]) for r in rows)
    (out / "kernels_correctness.json").write_text(json.dumps({"worst_rel_error": worst, "rows": rows}, indent=1))
    print(f"correctness: worst relative error {worst:.3g} over {len(rows)} cases", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    from compressor import api

    start = time.perf_counter()
    check_kernels(args.out)
    result = api.bench(tokens="1,4,16,64", device="cuda")
    (args.out / "bench_shapes.json").write_text(json.dumps(result.to_json(), indent=1))
    print(f"shapes timed ({time.perf_counter() - start:.0f} s)", flush=True)
    if not args.skip_decode:
        model = Path("/tmp/llama8b-8l")
        if not model.exists():
            subprocess.run([sys.executable, str(Path(__file__).with_name("synthetic_llama.py")), "--shape", "llama-3-8b",
                            "--layers", "8", "-o", str(model)], check=True)
        decode = api.bench(str(model), tokens="1,4,16,64", target=0.5, new_tokens=32, device="cuda", dtype=torch.bfloat16)
        (args.out / "bench_decode.json").write_text(json.dumps(decode.to_json(), indent=1))
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
