"""What decomposing bfloat16-product Grams in float32 instead of float64 costs the factors.

    python benchmarks/decomposition_precision.py [--windows 16] [--blocks 0 1 15 29] [--keep 0.4]

For every target of the chosen SmolLM2 blocks, the Gram is collected as the tool collects it in
a bfloat16 calibration pass and decomposed twice, in float64 and in float32 (what the tool does
after bfloat16 passes). Each decomposition's factors at rank ⌊keep·min(out, in)⌋ are then measured
by the error they leave on the calibration inputs, ‖(W − B·A)·Xᵀ‖² = tr(ΔW·XᵀX·ΔWᵀ) in float64;
the float64 factors' error is the optimum, and the printed excess is how far above it the float32
factors land.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 1, 15, 29])
    parser.add_argument("--keep", type=float, default=0.4)
    args = parser.parse_args()

    from compressor.calibration.sources import load_calibration
    from compressor.factorize import _decompose_block
    from compressor.loading import load_model
    from compressor.pipeline import CALIBRATION_BATCH, iterate_blocks
    from compressor.residency import bound_kernel_caches
    from compressor.targets import select_targets

    bound_kernel_caches()
    loaded = load_model("smollm2-135m")
    calibration = load_calibration(CalibrationOptions(str(DATA / "wikitext2-valid.txt"), samples=args.windows, seq_len=512, seed=0), loaded.tokenizer)
    targets = [t for t in select_targets(loaded.model) if t.block_index is not None and t.block_index <= max(args.blocks)]
    print("| block | target | rank | float64 error (optimum) | float32 error | excess |")
    print("|---|---|---|---|---|---|")
    for step in iterate_blocks(loaded.model, calibration.batches(CALIBRATION_BATCH), targets, "blocks", torch.bfloat16):
        grams = step.collect_grams(block_final=True)
        if step.index not in args.blocks:
            continue
        exact = _decompose_block(step.targets, grams, dtype=torch.float64)
        fast = _decompose_block(step.targets, grams, dtype=torch.float32)
        for t in step.targets:
            rank = int(args.keep * min(t.shape))
            weight = t.weight().to(torch.float64)
            gram = grams[t.name].matrix

            def error(d) -> float:
                b, a = d.factors(weight, rank, torch.float64)
                delta = weight - b @ a
                return float(torch.trace(delta @ gram @ delta.T))

            best, got = error(exact[t.name]), error(fast[t.name])
            print(f"| {step.index} | {t.layer_type} | {rank} | {best:.5g} | {got:.5g} | {(got - best) / best:+.1e} |")


if __name__ == "__main__":
    main()
