"""The compress CLI: exit codes, one-line errors, and what eval/analyze write."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compressor
from compressor import api
from compressor.math import spectra
from compressor.targets import select_targets
from conftest import run_cli as _run


def _assert_one_error_line(err: str):
    lines = [line for line in err.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- success


def test_eval_writes_json(capsys, tmp_path, tiny_llama, small_text_file):
    out_json = tmp_path / "sub" / "out.json"
    code, out, err = _run(
        capsys, "eval", tiny_llama.path, "--data", small_text_file, "--seq-len", 16, "--json", out_json
    )
    assert code == 0, err
    assert "perplexity" in out
    data = json.loads(out_json.read_text())
    for key in ("perplexity", "tokens", "windows", "seconds", "nll", "seq_len", "model", "dtype"):
        assert key in data
    ids = tiny_llama.tokenizer(small_text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    assert data["windows"] == len(ids) // 16
    assert data["tokens"] == data["windows"] * 15
    assert data["seq_len"] == 16
    assert data["model"] == str(tiny_llama.path.resolve())
    assert data["dtype"] == "float32"
    assert data["perplexity"] == pytest.approx(
        api.evaluate(str(tiny_llama.path), small_text_file, seq_len=16).perplexity, rel=1e-6
    )
    assert not list(out_json.parent.glob(".*"))  # no temporary file left behind


def test_eval_max_windows_and_dtype(capsys, tmp_path, tiny_llama, small_text_file):
    out_json = tmp_path / "o.json"
    code, _, err = _run(
        capsys,
        "eval", tiny_llama.path, "--data", small_text_file, "--seq-len", 16,
        "--max-windows", 3, "--batch-size", 2, "--dtype", "bfloat16", "--json", out_json,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert (data["windows"], data["tokens"], data["dtype"]) == (3, 45, "bfloat16")


def test_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0
    assert compressor.__version__ in out


def test_analyze_json_and_plots(capsys, tmp_path, tiny_llama, text_file):
    out_json = tmp_path / "a.json"
    plots = tmp_path / "plots"
    code, out, err = _run(
        capsys,
        "analyze", tiny_llama.path, "--calib", text_file, "--calib-samples", 4, "--seq-len", 16,
        "--json", out_json, "--plots", plots,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out_json.read_text())
    targets = select_targets(tiny_llama.model)
    assert set(data["modules"]) == {t.name for t in targets}
    assert data["calibration"]["spec"] == str(text_file)
    assert (data["calibration"]["samples"], data["calibration"]["seq_len"], data["calibration"]["seed"]) == (4, 16, 0)
    assert data["cost_curve"]["basis"] == "whitened"
    assert len(data["cost_curve"]["points"]) == 7
    assert data["welore"]["target"] == 0.5
    assert data["tool"] == f"compress {compressor.__version__}"
    for t in targets:
        entry = data["modules"][t.name]
        assert entry["shape"] == list(t.shape)
        assert entry["params"] == t.params
        assert entry["block"] == t.block_index
        assert entry["layer_type"] == t.layer_type
        assert entry["calibration_tokens"] == 64
        assert set(entry["whitened"]["energy_ranks"]) == {"90", "95", "99"}
        sv = spectra.singular_values(t.weight())
        assert entry["stable_rank"] == pytest.approx(round(spectra.stable_rank(sv), 3), abs=1e-9)
        assert entry["energy_ranks"]["90"] == spectra.energy_rank(sv, 0.9)
        assert 1 <= entry["welore_rank"] <= min(t.shape)
    for name in ("spectra_plain.png", "spectra_whitened.png", "cost_curve.png"):
        png = plots / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert f"{len(targets)} modules analyzed" in out


def test_analyze_without_calibration(capsys, tmp_path, tiny_llama):
    out_json = tmp_path / "a.json"
    plots = tmp_path / "plots"
    code, _, err = _run(capsys, "analyze", tiny_llama.path, "--calib", "none", "--json", out_json, "--plots", plots)
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["calibration"] is None
    assert data["cost_curve"]["basis"] == "plain"
    assert len(data["modules"]) == 14
    assert all("whitened" not in m and "calibration_tokens" not in m for m in data["modules"].values())
    assert sorted(p.name for p in plots.iterdir()) == ["cost_curve.png", "spectra_plain.png"]


def test_analyze_include_lm_head(capsys, tmp_path, tiny_llama, text_file):
    out_json = tmp_path / "a.json"
    code, _, err = _run(
        capsys,
        "analyze", tiny_llama.path, "--calib", text_file, "--calib-samples", 2, "--seq-len", 16,
        "--include", "*lm_head", "--include", "*.0.mlp.down_proj", "--json", out_json,
    )  # fmt: skip
    assert code == 0, err
    modules = json.loads(out_json.read_text())["modules"]
    assert set(modules) == {"lm_head", "model.layers.0.mlp.down_proj"}
    assert modules["lm_head"]["block"] is None
    assert modules["lm_head"]["calibration_tokens"] == 32


def test_analyze_self_calibration_on_gpt2(capsys, tmp_path, tiny_gpt2):
    out_json = tmp_path / "a.json"
    code, _, err = _run(
        capsys, "analyze", tiny_gpt2.path, "--calib-samples", 2, "--seq-len", 8, "--exclude", "*.mlp.*", "--json", out_json
    )
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["calibration"]["spec"] == "self"
    assert set(data["modules"]) == {f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")}
    assert data["modules"]["transformer.h.0.attn.c_attn"]["shape"] == [192, 64]


# ---------------------------------------------------------------- usage errors: 2


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "{model}", "--data", "{data}", "--no-such-flag"],
        ["eval", "{model}", "--data", "{data}", "--seq-len", "1"],
        ["eval", "{model}", "--data", "{data}", "--seq-len", "many"],
        ["eval", "{model}", "--data", "{data}", "--dtype", "float8"],
        ["eval", "{model}", "--data", "{data}", "--batch-size", "0"],
        ["eval", "{model}"],  # --data missing
        ["analyze", "{model}", "--welore-target", "2"],
        ["analyze", "{model}", "--welore-target", "0"],
        ["analyze", "{model}", "--calib-samples", "0"],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(capsys, tiny_llama, small_text_file, args):
    argv = [a.format(model=tiny_llama.path, data=small_text_file) for a in args]
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip()


def test_usage_error_mentions_help(capsys, tiny_llama, small_text_file):
    code, _, err = _run(capsys, "eval", tiny_llama.path, "--data", small_text_file, "--dtype", "float8")
    assert code == 2
    _assert_one_error_line(err)
    assert "dtype" in err and "--help" in err


def test_usage_error_before_loading(capsys, monkeypatch, tiny_llama):
    """A bad --welore-target fails before the model is loaded."""

    def no_load(*a, **k):
        raise AssertionError("the model should not be loaded")

    monkeypatch.setattr(compressor.loading, "load_model", no_load)
    code, _, err = _run(capsys, "analyze", tiny_llama.path, "--welore-target", "1.5")
    assert code == 2, err


def test_bad_output_or_input_fails_before_loading(capsys, monkeypatch, tiny_llama, small_text_file, tmp_path):
    """Everything the flags name is checked before the (slow) model load, and only once."""

    def no_load(*a, **k):
        raise AssertionError("the model should not be loaded")

    monkeypatch.setattr(compressor.loading, "load_model", no_load)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    factorize = ["factorize", tiny_llama.path, "--target", "0.5", "--calib", small_text_file]
    for args, code in (
        ([*factorize, "-o", taken], 2),  # a non-empty output folder without --overwrite
        ([*factorize, "-o", small_text_file], 2),  # an output that is a file
        (["factorize", tiny_llama.path, "--target", "0.5", "--calib", tmp_path / "none.txt", "-o", tmp_path / "o"], 3),
        (["factorize", tiny_llama.path, "--target", "0.5", "--calib", "data.csv", "-o", tmp_path / "o"], 2),
        (["factorize", tiny_llama.path, "--target", "0.5", "--method", "qr", "-o", tmp_path / "o"], 2),
        (["eval", tiny_llama.path, "--data", tmp_path / "none.txt"], 3),
        (["verify", tmp_path / "o", "--against", tiny_llama.path], 2),
        (["export-dense", tmp_path / "o", "-o", taken], 2),
    ):
        got, _, err = _run(capsys, *args)
        assert got == code, (args, err)
        _assert_one_error_line(err)


# ---------------------------------------------------------------- invalid input: 3


def test_missing_model_exit_3(capsys, tmp_path, small_text_file):
    code, _, err = _run(capsys, "eval", tmp_path / "no-model", "--data", small_text_file)
    assert code == 3
    _assert_one_error_line(err)
    assert "no-model" in err


def test_missing_data_exit_3(capsys, tmp_path, tiny_llama):
    code, _, err = _run(capsys, "eval", tiny_llama.path, "--data", tmp_path / "missing.txt", "--seq-len", 16)
    assert code == 3
    _assert_one_error_line(err)
    assert "missing.txt" in err


def test_unreadable_calibration_exit_3(capsys, tmp_path, tiny_llama):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf-8 \xe9" * 100)
    code, _, err = _run(capsys, "analyze", tiny_llama.path, "--calib", bad, "--calib-samples", 2, "--seq-len", 8)
    assert code == 3
    _assert_one_error_line(err)


def test_missing_calibration_exit_3(capsys, tmp_path, tiny_llama):
    code, _, err = _run(
        capsys, "analyze", tiny_llama.path, "--calib", tmp_path / "nope.jsonl", "--calib-samples", 2, "--seq-len", 8
    )
    assert code == 3
    _assert_one_error_line(err)


def test_corrupt_model_exit_3(capsys, tmp_path, tiny_llama, small_text_file):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_llama.path, folder)
    (folder / "model.safetensors").write_bytes(b"garbage" * 100)
    code, _, err = _run(capsys, "eval", folder, "--data", small_text_file, "--seq-len", 16)
    assert code == 3, err
    _assert_one_error_line(err)


def test_perplexity_of_encoder_exit_3(capsys, tiny_bert, small_text_file):
    code, _, err = _run(capsys, "eval", tiny_bert.path, "--data", small_text_file, "--seq-len", 16)
    assert code == 3
    _assert_one_error_line(err)


# ---------------------------------------------------------------- numerical failure: 4


def test_nan_weights_eval_exit_4(capsys, nan_llama_dir, small_text_file):
    code, _, err = _run(capsys, "eval", nan_llama_dir, "--data", small_text_file, "--seq-len", 16, "--max-windows", 2)
    assert code == 4, err
    _assert_one_error_line(err)


def test_nan_weights_analyze_exit_4(capsys, nan_llama_dir):
    code, _, err = _run(capsys, "analyze", nan_llama_dir, "--calib", "none")
    assert code == 4, err
    _assert_one_error_line(err)
    assert "NaN" in err


# ---------------------------------------------------------------- resources, interrupts, internal errors


def _raising(exc):
    def f(*args, **kwargs):
        raise exc

    return f


@pytest.mark.parametrize(
    "exc",
    [MemoryError(), torch.OutOfMemoryError("CUDA out of memory"), OSError(errno.ENOSPC, "No space left on device")],
    ids=["MemoryError", "torch-OOM", "ENOSPC"],
)
def test_out_of_resources_exit_5(capsys, monkeypatch, tiny_llama, small_text_file, exc):
    monkeypatch.setattr(api, "evaluate", _raising(exc))
    code, _, err = _run(capsys, "eval", tiny_llama.path, "--data", small_text_file, "--seq-len", 16)
    assert code == 5
    _assert_one_error_line(err)


def test_out_of_memory_while_loading_exit_5(capsys, monkeypatch, small_text_file):
    monkeypatch.setattr(compressor.loading, "load_model", _raising(MemoryError()))
    code, _, err = _run(capsys, "eval", "some/model", "--data", small_text_file)
    assert code == 5
    _assert_one_error_line(err)
    assert "memory" in err


def test_interrupted_exit_130(capsys, monkeypatch, tiny_llama, small_text_file):
    monkeypatch.setattr(api, "evaluate", _raising(KeyboardInterrupt()))
    code, _, err = _run(capsys, "eval", tiny_llama.path, "--data", small_text_file, "--seq-len", 16)
    assert code == 130
    _assert_one_error_line(err)
    assert "interrupted" in err


def test_internal_error_is_one_line(capsys, monkeypatch, tiny_llama, small_text_file):
    monkeypatch.setattr(api, "evaluate", _raising(RuntimeError("boom")))
    code, _, err = _run(capsys, "eval", tiny_llama.path, "--data", small_text_file, "--seq-len", 16)
    assert code == 70
    _assert_one_error_line(err)
    assert "boom" in err and "--debug" in err


def test_debug_shows_traceback(capsys, monkeypatch, tmp_path, tiny_llama, small_text_file):
    code, _, err = _run(capsys, "--debug", "eval", tiny_llama.path, "--data", tmp_path / "missing.txt")
    assert code == 3
    assert "error:" in err
    assert "Traceback" in err
    assert "InvalidInputError" in err


# ---------------------------------------------------------------- the installed script


def _compress_script() -> Path:
    script = Path(sys.executable).parent / "compress"
    if not script.is_file():
        pytest.skip(f"the compress script is not installed next to {sys.executable}")
    return script


def test_script_help():
    proc = subprocess.run([str(_compress_script()), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "eval" in proc.stdout and "analyze" in proc.stdout
