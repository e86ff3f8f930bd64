"""Fuzz the safetensors, shard-index, config.json and GGUF readers with random corruptions of real
files (see tests/fuzzing.py for the mutations and what counts as a failure).

Each case damages a copy of a tiny LLaMA (a single-file folder, a sharded one, a GGUF) and runs
``compress analyze PATH --calib none`` in-process under a time limit. Allowed: exit 3, exit 4
(NaN/Inf), and exit 0 when the model holds exactly the files' tensors. Prints a summary and every
failing case with the command that reproduces it; writes the summary as JSON with --json.

    python benchmarks/fuzz_readers.py --cases 300 --seed 1 --json benchmarks/results/fuzz_readers.json
    python benchmarks/fuzz_readers.py --reader gguf --seed 1 --case 17 --keep   # one case, files kept
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("COMPRESS_DEBUG", None)
os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF conversion shows a tqdm bar per load

import torch  # noqa: E402

import fuzzing  # noqa: E402  (tests/fuzzing.py)
from conftest import build_model, build_tokenizer  # noqa: E402  (the tests' tiny-model builders)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100, help="cases per reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=None, help="stop starting new cases after this long")
    parser.add_argument("--reader", action="append", choices=fuzzing.READERS, help="only these readers (repeatable)")
    parser.add_argument("--case", type=int, default=None, help="run only this case index (to reproduce it)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds one case may take before it counts as a hang")
    parser.add_argument("--keep", action="store_true", help="keep the damaged files (printed) instead of deleting them")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put fixtures and cases (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case, not only failures")
    parser.add_argument("--debug", action="store_true", help="run the CLI with --debug and print a failure's traceback")
    args = parser.parse_args()

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # transformers' warnings about the damaged files: the outcome says enough
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if args.debug:
        from compressor import cli

        cli._state["debug"] = True
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fuzz-readers-"))
    started = time.perf_counter()
    fixtures = fuzzing.build_fixtures(work / "fixtures", build_model("llama"), build_tokenizer())
    readers = args.reader or list(fuzzing.READERS)
    deadline = None if args.seconds is None else started + args.seconds

    def report(o: fuzzing.Outcome) -> None:
        if o.failed or args.verbose or args.case is not None:
            print(f"[{o.verdict}] {o.reader} case {o.index} ({o.seconds:.1f} s): {o.mutation}")
            print(f"    exit {o.code}; {o.why or o.error_line}")
            if o.failed:
                print(f"    reproduce: {o.reproduce()}")
                if args.debug:
                    print("    " + o.stderr_tail.replace("\n", "\n    "))
            if args.keep:
                print(f"    files: {work / 'cases' / f'{o.reader}-{o.index}'}")

    outcomes = fuzzing.run_cases(readers, args.cases, args.seed, fixtures, work / "cases", args.time_limit,
                                 deadline, args.case, args.keep, report)
    summary = fuzzing.summarize(outcomes)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["seed"] = args.seed
    summary["command"] = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])
    for reader, r in summary["readers"].items():
        outcomes_text = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["exit_codes"].items()))
        print(f"{reader:12} {r['cases']:4} cases  {outcomes_text}  (exit codes {codes}; {r['seconds']} s)")
    print(f"{summary['cases']} cases in {summary['seconds']} s, {len(summary['failures'])} failures")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
