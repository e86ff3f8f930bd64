"""SmolLM2 factorized at 0.8 with each way of collecting the calibration statistics, by the quality
test's protocol (8 windows of 256 of WikiText-2 validation, seed 0; perplexity on 2 windows of 512
of WikiText-2 test; `fisher`, `global`, one-shot).

    python benchmarks/gram_statistics_quality.py inputs inputs-f64 outputs

* ``inputs``: the default: input Grams XᵀX, float32 sums of the bfloat16 products.
* ``inputs-f64``: the same summed in float64 (as before issue 21).
* ``outputs``: for matrices with fewer outputs than inputs, the Gram of the outputs W·x instead
  (``collect_grams(outputs_where_narrower=True)``, float32 products from the float32 weight).

Each variant runs in its own process, one line per variant.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = ("inputs", "inputs-f64", "outputs")


def run(variant: str) -> float:
    import torch

    import compressor
    import compressor.calibration.grams as grams
    import compressor.pipeline as pipeline
    from compressor import api
    from compressor.calibration.sources import tokenize_text
    from compressor.evaluate import perplexity
    from compressor.factorize import factorize_model
    from compressor.options import CalibrationOptions, FactorizeOptions
    from compressor.targets import select_targets

    if variant == "inputs-f64":
        grams._sum_dtype = lambda product: torch.float64
    if variant == "outputs":
        collect = pipeline.BlockStep.collect_grams
        pipeline.BlockStep.collect_grams = lambda self, block_final=False, only=None, outputs_where_narrower=False: collect(
            self, block_final, only, True
        )
    base = compressor.load_model("smollm2-135m")
    calibration = api.calibrate(base, CalibrationOptions(str(DATA / "wikitext2-valid.txt"), samples=8, seq_len=256, seed=0))
    ids = tokenize_text(base.tokenizer, (DATA / "wikitext2-raw-test.txt").read_text(encoding="utf-8"))
    factorize_model(base.model, select_targets(base.model), FactorizeOptions(0.8, method="fisher", alloc="global"), calibration)
    with torch.inference_mode():
        return perplexity(base.model, ids, seq_len=512, max_windows=2, batch_size=2).perplexity


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--one":
        print(f"{argv[1]}: {run(argv[1]):.4f}", flush=True)
        return 0
    for variant in argv or VARIANTS:
        if variant not in VARIANTS:
            print(f"unknown variant {variant}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
            return 2
        done = subprocess.run([sys.executable, __file__, "--one", variant], capture_output=True, text=True)
        print(done.stdout.strip().splitlines()[-1] if done.returncode == 0 else f"{variant}: failed\n{done.stderr[-2000:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
