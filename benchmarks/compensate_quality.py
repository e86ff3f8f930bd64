"""Perplexity of compressed SmolLM2 before and after compensation: the README's compensation table.

    python benchmarks/compensate_quality.py --out benchmarks/results/compensate_quality.json

Bases: RTN (``rtn:BITS:GROUP``, quantized in memory by compressor.quantize), a GPTQ checkpoint
(``gptq:FOLDER``, e.g. written by ``compress quantize --method gptq``) or a factored checkpoint
(``factored:FOLDER``). Each base is evaluated as it is and with every compensation in --comp
(``METHOD:ALLOC:MODE:RANK[:FISHER_WINDOWS]``, e.g. ``eora:uniform:seq:16``).
Calibration: 64 windows of 512 tokens of WikiText-2 validation, seed 0. Evaluation: the
`compress eval` protocol on the first 32 windows of 512 of WikiText-2 test, and on --extra texts
(text unlike the calibration set). Rows are appended to --out as they finish.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from compressor import api
from compressor.calibration.sources import read_text, tokenize_text
from compressor.compensate import compensate_model
from compressor.evaluate import perplexity
from compressor.formats.adapter import terms_applied
from compressor.loading import load_model
from compressor.options import CalibrationOptions, CompensateOptions
from compressor.targets import select_targets

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rtn_in_place(model: torch.nn.Module, bits: int, group_size: int, sym: bool) -> None:
    """Every block linear replaced by its RTN-dequantized weight (what a GPTQ checkpoint of it holds)."""
    from compressor.quantize import rtn_quantize

    with torch.no_grad():
        for t in select_targets(model):
            t.module.weight.copy_(rtn_quantize(t.weight(), bits, group_size, sym).dequantize().to(t.module.weight.dtype))


def base_model(spec: str, original) -> tuple[torch.nn.Module, str]:
    kind, _, rest = spec.partition(":")
    if kind == "rtn":
        bits, group, *sym = rest.split(":")
        model = copy.deepcopy(original.model)
        rtn_in_place(model, int(bits), int(group), sym != ["asym"])
        return model, spec
    if kind in ("gptq", "factored", "folder"):
        return load_model(rest).model, spec
    raise SystemExit(f"unknown base {spec!r}")


def comp_options(spec: str) -> CompensateOptions:
    method, alloc, mode, rank, *windows = spec.split(":")
    extra = {"fisher_windows": int(windows[0])} if windows else {}
    return CompensateOptions(rank=int(rank), method=method, alloc=alloc, sequential=mode == "seq", **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default=str(DATA / "wikitext2-valid.txt"))
    parser.add_argument("--eval", default=str(DATA / "wikitext2-raw-test.txt"))
    parser.add_argument("--extra", nargs="*", default=[], help="more evaluation texts (unlike the calibration set)")
    parser.add_argument("--bases", nargs="+", default=["rtn:3:128", "rtn:4:128"])
    parser.add_argument("--comp", nargs="*", default=["svd:uniform:one:16", "eora:uniform:seq:16", "eora:uniform:seq:64"])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--no-original", action="store_true", help="skip evaluating the original model")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", action="store_true", help="print --out's rows as a markdown table and exit")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(args.out.read_text()))
        return

    torch.manual_seed(0)
    original = load_model(args.model)
    texts = {Path(p).name: tokenize_text(original.tokenizer, read_text(p)) for p in [args.eval, *args.extra]}
    calibration = api.calibrate(original, CalibrationOptions(args.calib, args.calib_samples, 512, 0))
    rows = json.loads(args.out.read_text()) if args.out and args.out.exists() else []

    def evaluate(model) -> dict:
        return {
            name: round(perplexity(model, ids, seq_len=512, max_windows=args.eval_windows).perplexity, 3)
            for name, ids in texts.items()
        }

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")

    if not args.no_original:
        emit({"base": "original", "compensation": None, "perplexity": evaluate(original.model)})
    for base_spec in args.bases:
        model, name = base_model(base_spec, original)
        targets = select_targets(model, factored=True)
        emit({"base": name, "compensation": None, "perplexity": evaluate(model)})
        for spec in args.comp:
            options = comp_options(spec)
            start = time.perf_counter()
            outcome = compensate_model(original.model, model, targets, options, calibration)
            seconds = time.perf_counter() - start
            shapes_params = sum(sum(t.shape) for t in targets)
            with terms_applied(model, outcome.corrections):
                ppl = evaluate(model)
            emit({
                "base": name,
                "compensation": spec,
                "perplexity": ppl,
                "mean_rank": outcome.adapter_params / shapes_params,
                "adapter_params": outcome.adapter_params,
                "mean_relative_error": round(outcome.mean_relative_error, 4),
                "seconds": round(seconds, 1),
            })


def print_table(rows: list[dict]) -> None:
    """The last row of each (base, compensation) as a markdown table, texts as columns."""
    latest = {(r["base"], r["compensation"]): r for r in rows}
    texts = list(next(iter(latest.values()))["perplexity"])
    print("| base | compensation | mean rank | " + " | ".join(texts) + " | seconds |")
    print("|---|---|---|" + "---|" * len(texts) + "---|")
    for (base, comp), r in latest.items():
        rank = f"{r['mean_rank']:.0f}" if "mean_rank" in r else "-"
        cells = " | ".join(f"{r['perplexity'][t]:.2f}" for t in texts)
        print(f"| {base} | {comp or '-'} | {rank} | {cells} | {r.get('seconds', '-')} |")


if __name__ == "__main__":
    main()
