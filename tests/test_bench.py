"""compress bench: shapes parsed and checked, the figures it derives, the CLI's outputs."""

from __future__ import annotations

import json

import pytest

from compressor import api
from compressor.bench import DEFAULT_SHAPES, Shape, ShapeResult, parse_shapes, parse_tokens, rank_for
from compressor.errors import UsageError

from conftest import run_cli


def test_shapes_and_tokens_are_parsed_and_checked():
    assert parse_shapes("4096x4096x1024, 14336X4096x1592") == [Shape(4096, 4096, 1024), Shape(14336, 4096, 1592)]
    for bad in ["4096x4096", "ax4x2", "8x8x9", "8x8x0", ""]:
        with pytest.raises(UsageError, match="--shapes"):
            parse_shapes(bad)
    assert parse_tokens("1,4,16") == [1, 4, 16]
    for bad in ["0", "1,x", ""]:
        with pytest.raises(UsageError, match="--tokens"):
            parse_tokens(bad)


def test_the_ceiling_and_the_default_shapes():
    """mn / (r(m+n)): 2.0 at half the parameters of a square matrix; the defaults keep 0.5 and 0.8."""
    assert Shape(4096, 4096, 1024).ceiling == pytest.approx(2.0)
    for shape in parse_shapes(DEFAULT_SHAPES):
        kept = shape.rank * (shape.out + shape.inp) / (shape.out * shape.inp)
        assert min(abs(kept - 0.5), abs(kept - 0.8)) < 1e-3
        assert shape.ceiling == pytest.approx(1 / kept)
    assert rank_for(4096, 4096, 0.5) == 1024


def test_derived_figures():
    r = ShapeResult("8x8x2", 4, "float32", dense_us=10.0, factored_us=5.0, corrected_us=11.0, ceiling=2.0,
                    factored_bytes=1000, copy_gbs=100.0)
    assert r.speedup == 2.0 and r.efficiency == 1.0
    assert r.correction_overhead == pytest.approx(0.1)
    assert r.eta("factored") == pytest.approx(1000 / (5e-6 * 100e9))
    assert ShapeResult("8x8x2", 4, "float32", 1.0, 1.0, 1.0, 2.0).eta() is None  # no copy bandwidth measured


def test_bench_times_shapes_on_the_cpu_and_writes_json_and_a_plot(capsys, tmp_path):
    code, out, err = run_cli(capsys, "bench", "--shapes", "96x64x16,40x72x40", "--tokens", "1,5", "--rounds", "2",
                             "--device", "cpu", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))
    assert code == 0, err
    assert "96x64x16" in out and "compress bench: CPU" in out
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["kernels"] == "auto" and record["device"].startswith("CPU")
    rows = record["shapes"]
    assert [(r["shape"], r["tokens"]) for r in rows] == [("96x64x16", 1), ("96x64x16", 5), ("40x72x40", 1), ("40x72x40", 5)]
    for r in rows:
        assert r["dense_us"] > 0 and r["factored_us"] > 0 and r["corrected_us"] > 0
        assert r["speedup"] == pytest.approx(r["dense_us"] / r["factored_us"])
        assert r["ceiling"] == pytest.approx(Shape(*map(int, r["shape"].split("x"))).ceiling)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_decodes_a_model_dense_and_factored(tiny_llama):
    result = api.bench(str(tiny_llama.path), tokens=[2], new_tokens=3, target=0.5, device="cpu")
    assert not result.shapes  # a MODEL alone: its decode only
    (d,) = result.decode
    assert d.tokens_per_step == 2 and d.new_tokens == 3
    assert d.dense_tokens_per_s > 0 and d.factored_tokens_per_s > 0
    assert d.params_factored < d.params_dense


def test_bench_refuses_bad_options(capsys):
    code, _, err = run_cli(capsys, "bench", "--shapes", "8x8x99", "--device", "cpu")
    assert code == 2 and "--shapes" in err
    code, _, err = run_cli(capsys, "bench", "--kernels", "cublas", "--shapes", "8x8x2", "--device", "cpu")
    assert code == 2 and "cublas" in err
