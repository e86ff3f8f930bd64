"""How close `compress check --baseline`'s KL estimate comes to the exact KL, and what dropping
the tail (top-K tokens plus one bin for the rest) would give instead.

SmolLM2 against RTN copies of itself (asymmetric, group 128) at 2, 3, 4 and 8 bits, on the first
windows of WikiText-2 test. Prints a table and writes benchmarks/results/check_kl_estimate.json.

    python benchmarks/check_kl_estimate.py --windows 4
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import compressor
from compressor.api import targets_of
from compressor.calibration.sources import tokenize_text
from compressor.evaluate import TAIL_SAMPLES, TOP_K, _log_probs, compare, eval_windows
from compressor.options import QuantizeOptions
from compressor.quantize import quantize_rtn

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-raw-test.txt"


def binned_kl(log_p: torch.Tensor, log_q: torch.Tensor, k: int) -> float:
    """KL between the two distributions lumped into the reference's top k tokens and one bin."""
    top, idx = log_p.topk(k, -1)
    q_top = log_q.gather(-1, idx)
    p_rest = (1 - top.exp().sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    return float(((top.exp() * (top - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "check_kl_estimate.json")
    args = parser.parse_args()

    loaded = compressor.load_model("smollm2-135m")
    ids = tokenize_text(loaded.tokenizer, args.data.read_text(encoding="utf-8"))
    windows = eval_windows(ids, args.seq_len, args.windows)
    _, baseline = compare(None, loaded.model, ids, seq_len=args.seq_len, max_windows=args.windows, record=True)
    rows = []
    for bits in (8, 4, 3, 2):
        quantized = copy.deepcopy(loaded)
        quantize_rtn(targets_of(quantized), QuantizeOptions(bits=bits, group_size=128, sym=False))
        exact, _ = compare(quantized.model, loaded.model, ids, seq_len=args.seq_len, max_windows=args.windows)
        estimated, _ = compare(quantized.model, None, ids, seq_len=args.seq_len, max_windows=args.windows, baseline=baseline)
        with torch.inference_mode():
            log_p = _log_probs(loaded.model, windows)
            log_q = _log_probs(quantized.model, windows)
        binned = binned_kl(log_p, log_q, TOP_K) / log_p.shape[0]
        rows.append({
            "bits": bits, "kl_exact": exact.kl, "kl_estimated": estimated.kl, "estimate_over_exact": estimated.kl / exact.kl,
            f"kl_top{TOP_K}_plus_rest_bin": binned, "binned_over_exact": binned / exact.kl,
            "top1_live": exact.top1_agreement, "top1_baseline": estimated.top1_agreement,
        })
        print(f"w{bits}: exact {exact.kl:.5f}  estimated {estimated.kl:.5f} ({estimated.kl / exact.kl:.4f})  "
              f"top-{TOP_K}+bin {binned:.5f} ({binned / exact.kl:.4f})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": f"python benchmarks/check_kl_estimate.py --windows {args.windows}",
        "windows": args.windows, "seq_len": args.seq_len, "top_k": TOP_K, "tail_samples": TAIL_SAMPLES, "rows": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
