"""Rendering results: rich tables, JSON files and PNG plots. The only place that formats."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compressor.analysis import Analysis
from compressor.formats.atomic import raise_output_error



def write_json(path: str | Path, data: dict) -> None:
    """Write JSON atomically (:func:`write_text_atomically`)."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")  # what is not JSON fails before any file


def write_text_atomically(path: str | Path, text: str) -> None:
    """A temporary file in the same folder, then a rename. Readers see the old file or the new
    one, never part of one; the temporary file is gone on any error or interrupt (and, left by a
    killed run, removed by the next write of ``path``). A full disk is OutOfResourcesError, a
    path that cannot be written UsageError (:func:`compressor.formats.atomic.output_error`)."""
    from compressor.formats.atomic import remove_stale, scratch_prefix

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(path, "partial"), dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                if hasattr(os, "fchmod"):  # the mode a plain open gives, not mkstemp's 0600
                    umask = os.umask(0o022)
                    os.umask(umask)
                    os.fchmod(f.fileno(), 0o666 & ~umask)
                f.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise_output_error(e, path)


def analysis_table(analysis: Analysis, console: Console) -> None:
    whitened = analysis.modules[0].whitened is not None
    by_type: dict[str, list] = defaultdict(list)
    for m in analysis.modules:
        by_type[m.layer_type].append(m)
    table = Table(title=f"Spectra by layer type ({len(analysis.modules)} modules)")
    for col in ("layer type", "count", "shape", "stable rank", f"WeLore rank @{analysis.welore_target}", "r90", "r95", "r99"):
        table.add_column(col, justify="right" if col != "layer type" else "left")
    if whitened:
        for col in ("whitened r90", "whitened r95", "whitened r99"):
            table.add_column(col, justify="right")

    def mean(values) -> str:
        values = list(values)
        return f"{sum(values) / len(values):.0f}"

    for layer_type, mods in by_type.items():
        row = [
            layer_type,
            str(len(mods)),
            "×".join(map(str, mods[0].shape)),
            f"{sum(m.plain.stable_rank for m in mods) / len(mods):.1f}",
            mean(m.welore_rank for m in mods),
            *(mean(m.plain.energy_ranks[k] for m in mods) for k in ("90", "95", "99")),
        ]
        if whitened:
            row += [mean(m.whitened.energy_ranks[k] for m in mods) for k in ("90", "95", "99")]
        table.add_row(*row)
    console.print(table)
    curve = Table(title=f"Predicted cost: mean relative {analysis.cost_basis} error of the linear layers")
    for col in ("kept ratio", "uniform ranks", "allocated ranks", "allocated kept"):
        curve.add_column(col, justify="right")
    for p in analysis.cost_curve:
        curve.add_row(f"{p.kept_ratio:.1f}", f"{p.uniform_error:.4f}", f"{p.allocated_error:.4f}", f"{p.allocated_kept:.4f}")
    console.print(curve)


def analysis_plots(analysis: Analysis, folder: str | Path) -> list[Path]:
    """Spectra by layer type (plain and, with calibration, whitened) and the predicted cost curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise_output_error(e, folder)
    written = []
    kinds = [("plain", lambda m: m.plain)]
    if analysis.modules[0].whitened is not None:
        kinds.append(("whitened", lambda m: m.whitened))
    by_type: dict[str, list] = defaultdict(list)
    for m in analysis.modules:
        by_type[m.layer_type].append(m)
    blocks = [m.block_index or 0 for m in analysis.modules]
    top = max(blocks) or 1
    for kind, get in kinds:
        n = len(by_type)
        cols = min(4, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax, (layer_type, mods) in zip(axes.flat, by_type.items()):
            for m in mods:
                sv = get(m).singular_values
                ax.semilogy((sv / sv[0]).numpy(), color=plt.cm.viridis((m.block_index or 0) / top), lw=0.8)
            ax.set_title(layer_type, fontsize=9)
            ax.set_xlabel("index")
            ax.set_ylabel("σ / σ₁")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"{kind} singular values (colour: layer index)")
        fig.tight_layout()
        path = folder / f"spectra_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ratios = [p.kept_ratio for p in analysis.cost_curve]
    ax.plot(ratios, [p.uniform_error for p in analysis.cost_curve], "o-", label="uniform ranks")
    ax.plot(ratios, [p.allocated_error for p in analysis.cost_curve], "s-", label="allocated ranks")
    ax.set_xlabel("kept fraction of linear-layer parameters")
    ax.set_ylabel(f"mean relative {analysis.cost_basis} error")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("predicted cost")
    fig.tight_layout()
    path = folder / "cost_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def factorize_summary(result, console: Console) -> None:
    """Ranks by layer type, parameters before and after, file size, seconds."""
    plan = result.outcome.plan
    by_type: dict[str, list] = defaultdict(list)
    for m in plan.modules:
        by_type[m.layer_type].append(m)
    table = Table(title=f"Rank plan: --target {plan.options.target} ({plan.options.method}, {plan.options.alloc}{', sequential' if plan.options.sequential else ''})")
    for col in ("layer type", "shape", "min rank", "mean rank", "max rank", "dense", "params before", "params after", "pred. rel. error"):
        table.add_column(col, justify="left" if col == "layer type" else "right")
    for layer_type, mods in by_type.items():
        ranks = [m.rank for m in mods if m.rank is not None]
        table.add_row(
            layer_type,
            "×".join(map(str, mods[0].shape)),
            str(min(ranks)) if ranks else "-",
            f"{sum(ranks) / len(ranks):.0f}" if ranks else "-",
            str(max(ranks)) if ranks else "-",
            str(sum(m.rank is None for m in mods)),
            f"{sum(m.params_before for m in mods):,}",
            f"{sum(m.params_after for m in mods):,}",
            f"{sum(m.relative_error for m in mods) / len(mods):.4f}",
        )
    console.print(table)
    o = result.outcome
    console.print(
        f"targets kept [bold]{plan.kept_fraction:.4f}[/] of their parameters ({plan.params_after:,} of {plan.params_before:,}); "
        f"whole model {o.model_fraction:.4f} ({o.model_params_after:,} of {o.model_params_before:,}); "
        f"predicted mean relative error {plan.mean_relative_error:.4f}"
    )
    where = f"wrote {result.output} ({_size(result.file_bytes)})" if result.output else "dry run: nothing written"
    console.print(f"{where} in {result.seconds:.1f} s")


def check_table(result, console: Console) -> None:
    """The metrics of a ``compress check`` run, each with its threshold and verdict."""
    c = result.comparison
    table = Table(title=f"compress check: {c.windows} windows × {c.seq_len} tokens ({c.tokens} predicted)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("result")
    for m in result.checks:
        verdict = "" if m.limit is None else ("[green]pass[/]" if m.passed else "[bold red]FAIL[/]")
        table.add_row(m.label, f"{m.value:.4f}", m.rule, verdict)
    console.print(table)


def write_junit(path: str | Path, result) -> None:
    """JUnit XML of a ``compress check`` run: one testcase per metric, a failure where a
    threshold does not hold, written atomically."""
    from xml.etree import ElementTree as ET

    suite = ET.Element(
        "testsuite", name="compress check", tests=str(len(result.checks)),
        failures=str(len(result.failures)), errors="0", skipped="0", time=f"{result.seconds:.3f}",
    )
    properties = ET.SubElement(suite, "properties")
    for key in ("original", "compressed", "adapter", "data", "baseline"):
        value = getattr(result, key)
        if value is not None:
            ET.SubElement(properties, "property", name=key, value=str(value))
    for m in result.checks:
        case = ET.SubElement(suite, "testcase", classname="compress.check", name=m.name, time="0")
        ET.SubElement(case, "system-out").text = f"{m.label} = {m.value:.6g}" + (f" (threshold {m.rule})" if m.rule else "")
        if not m.passed:
            ET.SubElement(case, "failure", message=f"{m.name} = {m.value:.6g}, threshold {m.rule}", type="threshold")
    ET.indent(suite)
    write_text_atomically(path, ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n")


def bench_tables(result, console: Console) -> None:
    """Per shape and token count: times, speedup against its ceiling, the correction's cost; then decode."""
    if result.shapes:
        gpu = result.shapes[0].copy_gbs is not None
        table = Table(title=f"compress bench: {result.device}, kernels {result.kernels}; µs per call, +r64: dense + rank-64 correction")
        for name in ["OUTxINxR", "tok", "dense", "factored", *(["2 matmuls"] if gpu else []), "speedup", "ceiling", "÷ceil", "+r64",
                     *(["η"] if gpu else [])]:
            if name == "OUTxINxR":  # whole: the other columns' headers wrap instead
                table.add_column(name, no_wrap=True, min_width=max(len(r.shape) for r in result.shapes))
            else:
                table.add_column(name, justify="right", no_wrap=True, min_width=max(len(name), 4))
        def us(v: float) -> str:
            return f"{v:.1f}" if v < 100 else f"{v:.0f}"

        for r in result.shapes:
            table.add_row(
                r.shape, str(r.tokens), us(r.dense_us), us(r.factored_us),
                *([us(r.two_matmul_us)] if gpu else []),
                f"{r.speedup:.2f}×", f"{r.ceiling:.2f}×", f"{r.efficiency:.2f}", f"{r.correction_overhead:+.0%}",
                *([f"{r.eta('factored'):.2f}"] if gpu else []),
            )
        console.print(table)
    if result.decode:
        table = Table(title="decode (greedy, one token per sequence per step)")
        for name in ["model", "kept", "tokens / step", "dense tok/s", "factored tok/s", "speedup"]:
            table.add_column(name, justify="left" if name == "model" else "right")
        for d in result.decode:
            table.add_row(d.model, f"{d.params_factored / d.params_dense:.3f}", str(d.tokens_per_step),
                          f"{d.dense_tokens_per_s:.1f}", f"{d.factored_tokens_per_s:.1f}", f"{d.speedup:.2f}×")
        console.print(table)


def bench_plot(result, path: str | Path) -> Path:
    """Speedup over dense against the ceiling mn / (r(m + n)), one point per shape and token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    tokens = sorted({r.tokens for r in result.shapes})
    for t in tokens:
        rows = [r for r in result.shapes if r.tokens == t]
        ax.scatter([r.ceiling for r in rows], [r.speedup for r in rows], label=f"{t} token{'s' if t > 1 else ''}")
    top = max([r.ceiling for r in result.shapes] + [r.speedup for r in result.shapes] + [1.0]) * 1.1
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="ceiling")
    ax.plot([0, top], [0, 0.9 * top], "k:", lw=0.8, label="0.9 × ceiling")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("ceiling mn / (r(m+n))")
    ax.set_ylabel("factored speedup over dense")
    ax.set_title(f"compress bench: {result.device}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise_output_error(e, path)
    finally:
        plt.close(fig)
    return path
