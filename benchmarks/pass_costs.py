"""Costs behind two settings of the calibration passes, on SmolLM2 and real text.

    python benchmarks/pass_costs.py [--windows 16] [--fisher-windows 8] [--repeats 2] [--profile]

1. Forward time of the blocks over ``--windows`` windows of 512 tokens in batches of 8, 4
   and 2 windows (bfloat16 autocast and chunked attention, as the layer loop runs them):
   what chose CALIBRATION_BATCH.
2. The output-Fisher pass over ``--fisher-windows`` windows with the release of memory-mapped
   weights on and off (``release`` stubbed out), alternating: what releasing costs in time.
3. With ``--profile``: torch.profiler's table of one forward over 8 windows (where a pass's
   time goes: matrix products, attention, element-wise ops).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--fisher-windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    import compressor.sensitivity as sensitivity
    from compressor import api
    from compressor.attention import chunked_causal_attention
    from compressor.calibration.sources import load_calibration
    from compressor.loading import load_model

    loaded = load_model("smollm2-135m")
    model = loaded.model.eval()
    calibration = load_calibration(CalibrationOptions(str(DATA / "wikitext2-valid.txt"), samples=max(args.windows, args.fisher_windows), seq_len=512, seed=0), loaded.tokenizer)
    ids = calibration.input_ids

    def forward(batch: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), chunked_causal_attention():
            for i in range(0, args.windows, batch):
                model.model(input_ids=ids[i : i + batch], use_cache=False)
        return time.perf_counter() - start

    forward(4)  # warm-up
    for _ in range(args.repeats):
        for batch in (8, 4, 2):
            print(f"forward, {args.windows} windows in batches of {batch}: {forward(batch):.2f} s", flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), chunked_causal_attention():
                model.model(input_ids=ids[:8], use_cache=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8), flush=True)

    targets = api.targets_of(loaded)
    windows = calibration.batches(1)[: args.fisher_windows]
    real_release = sensitivity.release
    for _ in range(args.repeats):
        for mode in ("on", "off"):
            sensitivity.release = real_release if mode == "on" else (lambda tensors: 0)
            start = time.perf_counter()
            sensitivity.output_fisher(model, targets, windows, torch.bfloat16)
            print(f"Fisher pass, {args.fisher_windows} windows, release {mode}: {time.perf_counter() - start:.2f} s", flush=True)
    sensitivity.release = real_release


if __name__ == "__main__":
    main()
