"""Peak host memory and wall time of a `compress` run on a checkpoint, against its size on disk.

    python benchmarks/scale_memory.py /tmp/synth-1b
    python benchmarks/scale_memory.py /tmp/synth-1b --calib-samples 4 --seq-len 256
    python benchmarks/scale_memory.py /tmp/synth-1b --label eval -- \\
        compress eval {model} --data /work/shared/data/wikitext2-raw-test.txt --max-windows 2

Without a command after ``--`` it runs

    compress factorize MODEL --target 0.8 --calib CALIB --calib-samples 16 --seq-len 512 -o OUT --overwrite

(``OUT`` a temporary folder, removed afterwards unless ``--keep-output``). In a command given
after ``--``, ``{model}`` and ``{out}`` stand for the checkpoint and the output folder, and a
leading ``compress`` is the one installed beside this Python.

The command runs as a subprocess in its own process group. Every ``--interval`` seconds the
resident set (RSS) of it and all its descendants is summed (psutil; without it, /proc); each
process's own high-water mark (VmHWM) is read as well, and after it ends the kernel's
``ru_maxrss`` of the waited-for children. The peak reported is the largest of these (the
sampled sum can miss a spike shorter than the interval; VmHWM and ru_maxrss cannot, but
count one process at a time). The anonymous part (RssAnon: heap, tensors) and the file-backed
part (RssFile: mapped files, such as safetensors read through mmap, which the kernel can drop
under pressure) are summed too, their peaks and their values at the sampled peak recorded,
and every 30 s a ``[seconds, RSS GiB, anonymous GiB]`` point. ``--timeout`` (default 45 min) and Ctrl-C stop the whole
group (SIGTERM, then SIGKILL after 10 s), and the record says so.

It prints a JSON record and appends it to ``benchmarks/results/scale_memory.json`` (a JSON
list): the command, the checkpoint's safetensors bytes on disk and parameter count (read
from the headers), peak RSS, peak RSS / checkpoint bytes, seconds, exit status, and the
machine. The command's output goes to ``--log`` (default: a file in /tmp).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale_memory.json"
DEFAULT_CALIB = "/work/shared/data/wikitext2-valid.txt"
GRACE_SECONDS = 10.0

try:
    import psutil
except ImportError:  # the /proc fallback below
    psutil = None


# --- the checkpoint ---------------------------------------------------------------------------

def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def checkpoint_facts(model: Path) -> dict:
    """Bytes on disk of the weight files and the parameter count from their headers (no tensor read)."""
    if model.is_file():
        files = [model]
    else:
        files = sorted(model.glob("*.safetensors"))
    n_params = 0
    for f in files:
        if f.suffix != ".safetensors":
            continue
        for name, entry in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            count = 1
            for d in entry["shape"]:
                count *= d
            n_params += count
    facts = {
        "checkpoint": str(model.resolve()),
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
        "checkpoint_files": len(files),
        "parameters": n_params if files and all(f.suffix == ".safetensors" for f in files) else None,
    }
    config = model / "config.json" if model.is_dir() else None
    if config and config.is_file():
        c = json.loads(config.read_text())
        facts["config"] = {k: c.get(k) for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                  "tie_word_embeddings", "dtype")}
    return facts


# --- the machine ------------------------------------------------------------------------------

def meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"host": platform.node(), "system": platform.platform(), "cpu": cpu, "cpus": usable,
            "memory_bytes": meminfo_bytes("MemTotal"), "python": platform.python_version()}


# --- sampling the process tree ----------------------------------------------------------------

def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _proc_children(pid: int) -> list[int]:
    """Descendants through /proc/PID/task/*/children (needs a kernel with CONFIG_PROC_CHILDREN)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(x) for x in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def sample_tree(pid: int, hwm: dict[int, int], parts: dict[str, int] | None = None) -> int:
    """The summed RSS of pid and its descendants now; updates hwm with each one's VmHWM and
    fills ``parts`` with the sums of RssAnon (heap, tensors) and RssFile (mapped files, e.g.
    safetensors read through mmap) where /proc has them."""
    pids = [pid]
    if psutil is not None:
        try:
            pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            pass
    else:
        pids += _proc_children(pid)
    total = 0
    if parts is not None:
        parts.update(RssAnon=0, RssFile=0)
    for p in pids:
        status = _proc_status(p)
        if not status and psutil is not None:
            try:
                rss = psutil.Process(p).memory_info().rss
            except psutil.Error:
                continue
            status = {"VmRSS": rss, "VmHWM": rss}
        total += status.get("VmRSS", 0)
        if parts is not None:
            for key in ("RssAnon", "RssFile"):
                parts[key] += status.get(key, 0)
        if "VmHWM" in status:
            hwm[p] = max(hwm.get(p, 0), status["VmHWM"])
    return total


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL after GRACE_SECONDS."""
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_measured(cmd: list[str], log: Path, timeout: float, interval: float) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    hwm: dict[int, int] = {}
    peak_sum, peak_at, timeline = 0, 0.0, []
    parts: dict[str, int] = {}
    peak_anon = peak_file = 0
    parts_at_peak: dict[str, int] = {}
    stopped = None
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        next_mark = 0.0
        try:
            while proc.poll() is None:
                now = time.perf_counter() - t0
                rss = sample_tree(proc.pid, hwm, parts)
                peak_anon = max(peak_anon, parts["RssAnon"])
                peak_file = max(peak_file, parts["RssFile"])
                if rss > peak_sum:
                    peak_sum, peak_at, parts_at_peak = rss, now, dict(parts)
                if now >= next_mark:  # a coarse trace of the resident set, every 30 s: [s, RSS, anonymous] GiB
                    timeline.append([round(now, 1), round(rss / 2**30, 3), round(parts["RssAnon"] / 2**30, 3)])
                    next_mark += 30.0
                if now > timeout:
                    stopped = f"timeout after {timeout:g} s"
                    stop_group(proc)
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            stopped = "interrupted (Ctrl-C)"
            stop_group(proc)
        finally:
            if proc.poll() is None:
                stop_group(proc)
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    # ru_maxrss of the children is a running maximum over all this process has waited for:
    # it belongs to this run only when it grew during it.
    children_maxrss = after if after > before else None
    peak = max([peak_sum, max(hwm.values(), default=0)] + ([children_maxrss] if children_maxrss else []))
    return {
        "returncode": rc, "stopped": stopped, "seconds": round(seconds, 1),
        "peak_rss_bytes": peak, "peak_rss_gib": round(peak / 2**30, 3),
        "peak_rss_sampled_sum_bytes": peak_sum, "peak_rss_sampled_at_s": round(peak_at, 1),
        "at_sampled_peak_anon_bytes": parts_at_peak.get("RssAnon"), "at_sampled_peak_file_bytes": parts_at_peak.get("RssFile"),
        "peak_anon_bytes": peak_anon, "peak_anon_gib": round(peak_anon / 2**30, 3), "peak_file_bytes": peak_file,
        "peak_vmhwm_bytes": max(hwm.values(), default=0), "children_ru_maxrss_bytes": children_maxrss,
        "processes_seen": len(hwm), "rss_timeline_gib": timeline,
    }


# --- the command ------------------------------------------------------------------------------

def resolve_compress(cmd: list[str]) -> list[str]:
    if cmd and cmd[0] == "compress":
        beside = Path(sys.executable).parent / "compress"
        if beside.is_file():
            return [str(beside)] + cmd[1:]
        found = shutil.which("compress")
        if found:
            return [found] + cmd[1:]
        return [sys.executable, "-m", "compressor"] + cmd[1:]
    return cmd


def tail(path: Path, lines: int = 15) -> list[str]:
    try:
        text = path.read_bytes()[-20000:].decode(errors="replace")
    except OSError:
        return []
    # progress bars rewrite one line with carriage returns: keep each line's last state
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()][-lines:]


def append_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    if path.is_file() and path.stat().st_size:
        records = json.loads(path.read_text())
    records.append(record)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    custom = None
    if "--" in argv:
        i = argv.index("--")
        argv, custom = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="the checkpoint folder (e.g. from synthetic_llama.py)")
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--calib", default=DEFAULT_CALIB)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--extra", action="append", default=[], help="one more argument for compress factorize (repeatable)")
    ap.add_argument("-o", "--output", type=Path, help="the command's output folder (default: a temporary one)")
    ap.add_argument("--keep-output", action="store_true", help="keep the temporary output folder")
    ap.add_argument("--timeout", type=float, default=45 * 60, help="seconds before the run is stopped (default 2700)")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between samples (default 0.2)")
    ap.add_argument("--label", default="", help="a free-form label stored in the record")
    ap.add_argument("--log", type=Path, help="where the command's output goes (default: /tmp/scale_memory-*.log)")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"JSON list to append to (default {RESULTS})")
    ap.add_argument("--no-save", action="store_true", help="print the record only")
    args = ap.parse_args(argv)

    if not args.model.exists():
        ap.error(f"no such checkpoint: {args.model}")
    temporary = args.output is None
    out = Path(tempfile.mkdtemp(prefix="scale_memory-out-")) if temporary else args.output
    if custom:
        cmd = [a.replace("{model}", str(args.model)).replace("{out}", str(out)) for a in custom]
    else:
        cmd = ["compress", "factorize", str(args.model), "--target", str(args.target), "--calib", args.calib,
               "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
               "-o", str(out), "--overwrite", *args.extra]
    cmd = resolve_compress(cmd)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log = args.log or Path(tempfile.gettempdir()) / f"scale_memory-{stamp}.log"

    facts = checkpoint_facts(args.model)
    print(f"running: {' '.join(cmd)}\n  output to {log}; timeout {args.timeout:g} s", flush=True)
    try:
        measured = run_measured(cmd, log, args.timeout, args.interval)
    finally:
        if temporary and not args.keep_output:
            shutil.rmtree(out, ignore_errors=True)
    output_bytes = None
    if not temporary and out.is_dir():
        output_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))

    record = {
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "label": args.label,
        "command": cmd,
        **facts,
        **measured,
        "peak_rss_over_checkpoint_bytes": (round(measured["peak_rss_bytes"] / facts["checkpoint_bytes"], 3)
                                           if facts["checkpoint_bytes"] else None),
        "output_safetensors_bytes": output_bytes,
        "log": str(log),
        "log_tail": tail(log) if measured["returncode"] != 0 or measured["stopped"] else tail(log, 3),
        "sampler": "psutil" if psutil is not None else "/proc",
        "machine": machine(),
    }
    print(json.dumps(record, indent=2))
    if not args.no_save:
        append_record(args.results, record)
        print(f"appended to {args.results}")
    return 0 if measured["returncode"] == 0 and not measured["stopped"] else 1


if __name__ == "__main__":
    sys.exit(main())
