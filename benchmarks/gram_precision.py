"""How far bfloat16 Gram products move the whitened spectra, and how much centering would help.

    python benchmarks/gram_precision.py [--windows 8] [--blocks 0 15 29]

In a bfloat16 calibration pass the Gram products are bfloat16 (autocast reaches the products
inside the collecting hooks), each batch's product rounded to 8 significant bits. For every
target of the chosen SmolLM2 blocks this collects its Gram three ways over the same inputs:
as the tool does (bfloat16 products of the rows), with each batch's rows centered on their
mean first (bfloat16 products of the centered rows, the mean's part n·μμᵀ added in float64;
measured, not taken: see docs/calibration-precision.md), and with float32 products (the reference); then it prints the
relative difference of the whitened energy beyond rank ⌊0.55·min(out, in)⌋ from the
reference's, and how far the leading subspace of that rank moved (Frobenius norm of the
difference of the two projectors; 0 = the same subspace).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    args = parser.parse_args()

    import compressor.calibration.grams as grams
    from compressor.calibration.sources import load_calibration
    from compressor.factorize import _decompose_block
    from compressor.loading import load_model
    from compressor.pipeline import iterate_blocks
    from compressor.residency import bound_kernel_caches
    from compressor.targets import select_targets

    bound_kernel_caches()
    tool_add = grams.Gram.add

    def centered_add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32, copy=True)
        n = rows.shape[0]
        mean = rows.sum(0).to(torch.float64) / n
        rows -= mean.to(torch.float32)
        tool_add(self, rows)
        root = mean * n**0.5
        self._upper.add_gram(root[None, :].to(self._upper.dtype))  # + n·meanᵀ·mean

    def float32_add(self, x: torch.Tensor) -> None:
        with torch.autocast("cpu", enabled=False):
            tool_add(self, x)

    loaded = load_model("smollm2-135m")
    model = loaded.model
    calibration = load_calibration(CalibrationOptions(str(DATA / "wikitext2-valid.txt"), samples=args.windows, seq_len=512, seed=0), loaded.tokenizer)
    targets = [t for t in select_targets(model) if t.block_index in args.blocks]
    ways = {"the tool": tool_add, "centered": centered_add, "float32 (reference)": float32_add}
    print("| block | target | rank | " + " | ".join(f"{w}: tail, subspace" for w in ways if "reference" not in w) + " |")
    print("|---|---|---|---|---|")
    for step in iterate_blocks(model, calibration.batches(2), targets, "blocks", torch.bfloat16):
        collected = {}
        for way, add in ways.items():
            grams.Gram.add = add
            try:
                collected[way] = step.collect_grams()
            finally:
                grams.Gram.add = tool_add
        for t in step.targets:
            ref = _decompose_block([t], collected["float32 (reference)"])[t.name]
            rank = int(0.55 * min(t.shape))
            tail_ref = float((ref.sv[rank:] ** 2).sum())
            cells = []
            for way in ways:
                if "reference" in way:
                    continue
                d = _decompose_block([t], collected[way])[t.name]
                tail = float((d.sv[rank:] ** 2).sum())
                moved = torch.linalg.matrix_norm(d.u[:, :rank] @ d.u[:, :rank].T - ref.u[:, :rank] @ ref.u[:, :rank].T)
                cells.append(f"{(tail - tail_ref) / tail_ref:+.2%}, {float(moved):.2f}")
            print(f"| {step.index} | {t.layer_type} | {rank} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
