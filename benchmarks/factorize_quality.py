"""Perplexity of factored SmolLM2 across targets, allocations and modes: the README's quality table.

    python benchmarks/factorize_quality.py --out results/factorize_quality.json

Calibration: 64 windows of 512 tokens of WikiText-2 validation, seed 0 unless --seed (and `self`).
Evaluation: the `compress eval` protocol on the first 32 windows of 512 of WikiText-2 test.
Runs on the GPU when there is one (`--device cuda`); the numbers do not depend on it beyond
floating-point noise.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import torch

from compressor import api
from compressor.calibration.sources import tokenize_text
from compressor.evaluate import perplexity
from compressor.factorize import decompose_all, factorize_model
from compressor.options import CALIB_DTYPES, SENSITIVITY_WINDOWS, CalibrationOptions, FactorizeOptions
from compressor.precision import resolve_calib_dtype
from compressor.sensitivity import fisher_scale, output_fisher
from compressor.loading import load_model
from compressor.targets import select_targets

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default=str(DATA / "wikitext2-valid.txt"))
    parser.add_argument("--eval", default=str(DATA / "wikitext2-raw-test.txt"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.6, 0.5])
    parser.add_argument("--allocs", nargs="+", default=["global", "relative", "uniform", "welore"])
    parser.add_argument("--modes", nargs="+", default=["one-shot"])
    parser.add_argument(
        "--sequential", nargs="*", default=["0.8:global", "0.6:global"], metavar="TARGET:ALLOC[:METHOD]",
        help="configurations also run with --sequential (a full second calibration pass each; method fisher unless given)",
    )
    parser.add_argument("--methods", nargs="+", default=["fisher"])
    parser.add_argument(
        "--calib-names", nargs="+", default=["wikitext2-valid"], choices=["wikitext2-valid", "self"],
        help="calibration sources to run the grid with (self: text the model samples itself)",
    )
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="of the calibration windows (which windows, or which text `self` samples)")
    parser.add_argument("--calib-dtypes", nargs="+", default=["auto"], choices=CALIB_DTYPES,
                        help="matmul dtype of the calibration passes; several: every row once per dtype")

    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--fisher-windows", type=int, default=SENSITIVITY_WINDOWS,
                        help="windows of the output-Fisher backward pass (the tool uses %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    loaded = load_model(args.model)
    original = copy.deepcopy(loaded.model).to(args.device)
    eval_ids = tokenize_text(loaded.tokenizer, Path(args.eval).read_text(encoding="utf-8"))

    def evaluate(model) -> float:
        return perplexity(model, eval_ids, seq_len=512, max_windows=args.eval_windows, batch_size=8).perplexity

    rows = [{"config": "baseline float32", "perplexity": evaluate(original)}]
    print(json.dumps(rows[-1]), flush=True)
    loaded.model = original
    specs = {"wikitext2-valid": args.calib, "self": "self"}
    calibrations = {
        name: api.calibrate(loaded, CalibrationOptions(specs[name], samples=args.calib_samples, seq_len=512, seed=args.seed)) for name in args.calib_names
    }

    # Each (method, allocation)'s one-shot rows, then its sequential ones: the first rows are the default's.
    sequential = [((spec.split(":") + ["fisher"])[:3]) for spec in args.sequential]
    configs = []
    for calib_name in args.calib_names:
        pending = list(sequential)
        for method, alloc in itertools.product(args.methods, args.allocs):
            configs += [(calib_name, t, method, alloc, mode) for mode in args.modes for t in args.targets]
            configs += [(calib_name, float(t), m, a, "sequential") for t, a, m in pending if (a, m) == (alloc, method)]
            pending = [(t, a, m) for t, a, m in pending if (a, m) != (alloc, method)]
        configs += [(calib_name, float(t), m, a, "sequential") for t, a, m in pending]
    configs = [(*c, dtype) for dtype in args.calib_dtypes for c in configs]
    # Pass 1 (decomposing the original weights) and the output Fisher are shared by all configurations
    # that would compute the same ones.
    shared: dict[tuple, dict] = {}
    fishers: dict[tuple[str, str], dict] = {}
    for calib_name, target, method, alloc, mode, calib_dtype in configs:
        model = copy.deepcopy(original)
        targets = select_targets(model)
        options = FactorizeOptions(
            target=target, method=method, alloc=alloc, sequential=mode == "sequential", calib_dtype=calib_dtype
        )
        compute_dtype = resolve_calib_dtype(calib_dtype, model)
        start = time.perf_counter()
        calibration = calibrations[calib_name]
        if options.needs_fisher and (calib_name, calib_dtype) not in fishers:
            windows = calibration.batches(1)[: args.fisher_windows]
            fishers[calib_name, calib_dtype] = output_fisher(model, targets, windows, compute_dtype)
        fisher = fishers.get((calib_name, calib_dtype))
        key = (calib_name, method, calib_dtype)
        if key not in shared:
            scales = {n: fisher_scale(v) for n, v in fisher.items()} if method == "fisher" else None
            shared[key] = decompose_all(
                model, targets, calibration if method != "svd" else None, scales, compute_dtype=compute_dtype
            )
        outcome = factorize_model(model, targets, options, calibration, decompositions=shared[key], fisher=fisher)
        seconds = time.perf_counter() - start
        row = {
            "calibration": calib_name,
            "seed": args.seed,
            "target": target,
            "method": method,
            "alloc": alloc,
            "mode": mode,
            "calib_dtype": outcome.plan.options.calib_dtype,
            "fisher_windows": args.fisher_windows if options.needs_fisher else None,
            "kept_fraction": round(outcome.plan.kept_fraction, 4),
            "predicted_mean_relative_error": round(outcome.plan.mean_relative_error, 4),
            "perplexity": evaluate(model),
            "factorize_seconds": round(seconds, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        if args.out:  # after every row, so that a long grid cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2) + "\n")
    print("\n| calibration | target | method | alloc | mode | calib dtype | kept | pred. rel. err | perplexity |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        print(
            f"| {r['calibration']} | {r['target']} | {r['method']} | {r['alloc']} | {r['mode']} | {r['calib_dtype']} | "
            f"{r['kept_fraction']} | {r['predicted_mean_relative_error']} | {r['perplexity']:.2f} |"
        )
    print(f"\nbaseline: {rows[0]['perplexity']:.3f}")


if __name__ == "__main__":
    main()
