"""compress check: the metrics against dense references, the baseline file, thresholds, exit codes, JUnit."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compressor import api, evaluate
from compressor.calibration.sources import tokenize_text
from compressor.check import MetricCheck, Thresholds, judge
from compressor.errors import InvalidInputError, UsageError
from compressor.evaluate import compare, eval_windows
from compressor.formats.baseline import baseline_json, read_baseline

from conftest import _save, build_model
from conftest import run_cli as _run

SEQ = 16


def _damaged(scale: float, tmp_path_factory, tokenizer) -> tuple[torch.nn.Module, Path]:
    """The tiny LLaMA with noise of relative size ``scale`` on every block weight: a stand-in
    for a compressed model."""
    model = build_model("llama")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=generator) * p.std() * scale)
    return model, _save(model, tokenizer, tmp_path_factory.mktemp(f"damaged-{scale}") / "model")


@pytest.fixture(scope="module")
def slightly(tmp_path_factory, tokenizer):
    return _damaged(0.05, tmp_path_factory, tokenizer)


@pytest.fixture(scope="module")
def badly(tmp_path_factory, tokenizer):
    return _damaged(3.0, tmp_path_factory, tokenizer)


def _dense_reference(model, reference, windows: torch.Tensor) -> dict[str, float]:
    """The metrics straight from both models' full logits, one window at a time."""
    with torch.no_grad():
        lq = model(input_ids=windows).logits[:, :-1].log_softmax(-1)
        lp = reference(input_ids=windows).logits[:, :-1].log_softmax(-1)
    labels = windows[:, 1:]
    tokens = labels.numel()
    return {
        "ppl": math.exp(float(-lq.gather(-1, labels[..., None]).sum()) / tokens),
        "ref_ppl": math.exp(float(-lp.gather(-1, labels[..., None]).sum()) / tokens),
        "kl": float(F.kl_div(lq, lp, log_target=True, reduction="sum")) / tokens,
        "top1": float((lq.argmax(-1) == lp.argmax(-1)).float().mean()),
    }


def test_comparison_equals_dense_reference(tiny_llama, slightly, text_file):
    model, _ = slightly
    ids = tokenize_text(tiny_llama.tokenizer, text_file.read_text())
    c, stats = compare(model, tiny_llama.model, ids, seq_len=SEQ, max_windows=6, batch_size=4)
    assert stats is None
    ref = _dense_reference(model, tiny_llama.model, eval_windows(ids, SEQ, 6))
    assert c.perplexity == pytest.approx(ref["ppl"], rel=1e-5)
    assert c.reference_perplexity == pytest.approx(ref["ref_ppl"], rel=1e-5)
    assert c.kl == pytest.approx(ref["kl"], rel=1e-4)
    assert c.top1_agreement == pytest.approx(ref["top1"])
    assert 0 < c.kl and 0 < c.top1_agreement < 1  # the damage shows, so the comparisons above could fail
    assert c.kl_method == "exact" and c.tokens == 6 * (SEQ - 1)


def test_a_model_compared_with_itself(tiny_llama, text_file):
    ids = tokenize_text(tiny_llama.tokenizer, text_file.read_text())
    c, _ = compare(tiny_llama.model, tiny_llama.model, ids, seq_len=SEQ, max_windows=4)
    assert c.kl == pytest.approx(0.0, abs=1e-7)
    assert c.top1_agreement == 1.0 and c.perplexity_ratio == pytest.approx(1.0)


def test_estimated_kl_is_exact_when_the_top_tokens_cover_the_vocabulary(tiny_llama, slightly, text_file, monkeypatch):
    monkeypatch.setattr(evaluate, "TOP_K", 10_000)  # more than the 320-token vocabulary: no tail
    model, _ = slightly
    ids = tokenize_text(tiny_llama.tokenizer, text_file.read_text())
    exact, stats = compare(model, tiny_llama.model, ids, seq_len=SEQ, max_windows=4, record=True)
    assert stats.tail_ids.shape[1] == 0
    estimated, _ = compare(model, None, ids, seq_len=SEQ, max_windows=4, baseline=stats)
    assert estimated.kl == pytest.approx(exact.kl, rel=1e-6)


def test_estimated_kl_is_unbiased():
    """The tail estimate over many positions converges on the exact KL, where dropping the tail
    (top tokens only) is far below it: the sampled term carries real weight."""
    torch.manual_seed(0)
    log_p = (torch.randn(4000, 300) * 1.5).log_softmax(-1)
    log_q = (log_p + 0.4 * torch.randn(4000, 300)).log_softmax(-1)
    exact = float((log_p.exp() * (log_p - log_q)).sum())
    stats = evaluate._summarize(log_p, torch.Generator().manual_seed(0))
    estimate = evaluate._estimated_kl(stats, log_q)
    without_tail = float((stats["top_logp"].exp() * (stats["top_logp"] - log_q.gather(-1, stats["top_ids"].long()))).sum())
    assert estimate == pytest.approx(exact, rel=0.02)
    assert without_tail < 0.9 * exact


def test_baseline_round_trip_gives_the_live_numbers(tiny_llama, slightly, text_file, tmp_path):
    model, _ = slightly
    ids = tokenize_text(tiny_llama.tokenizer, text_file.read_text())
    live, stats = compare(model, tiny_llama.model, ids, seq_len=SEQ, max_windows=6, batch_size=4, record=True)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline_json(stats, {"model": "tiny"})))
    read, meta = read_baseline(path)
    assert meta["model"] == "tiny" and read.tokens_sha256 == stats.tokens_sha256
    for key in ("top_ids", "top_logp", "tail_ids", "tail_logp_mean", "tail_mass"):
        assert torch.equal(getattr(read, key), getattr(stats, key)), key
    # another batch size: the windows, not the batches, are what the baseline is tied to
    again, _ = compare(model, None, ids, seq_len=SEQ, max_windows=6, batch_size=5, baseline=read)
    assert again.perplexity == pytest.approx(live.perplexity, rel=1e-6)
    assert again.reference_perplexity == pytest.approx(live.reference_perplexity, rel=1e-9)
    assert again.top1_agreement == live.top1_agreement
    assert again.kl == pytest.approx(live.kl, rel=0.1)  # estimated; a near-uniform tiny model's tail is most of the mass
    assert again.kl_method == "estimated"


def test_baseline_refuses_other_windows_and_tokens(tiny_llama, text_file, small_text_file):
    ids = tokenize_text(tiny_llama.tokenizer, text_file.read_text())
    _, stats = compare(None, tiny_llama.model, ids, seq_len=SEQ, max_windows=4, record=True)
    with pytest.raises(InvalidInputError, match="windows"):
        compare(tiny_llama.model, None, ids, seq_len=SEQ, max_windows=3, baseline=stats)
    other = tokenize_text(tiny_llama.tokenizer, small_text_file.read_text())
    with pytest.raises(InvalidInputError, match="other tokens"):
        compare(tiny_llama.model, None, other, seq_len=SEQ, max_windows=4, baseline=stats)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d.update(format="something-else"), "not a compress check baseline"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d["window_nll"].pop(), "window_nll"),
        (lambda d: d["window_nll"].__setitem__(0, float("nan")), "window_nll"),
        (lambda d: d["arrays"]["top_logp"].update(shape=[3, 3]), "top_logp"),
        (lambda d: d["arrays"]["tail_ids"].update(zlib_base64="not base64!"), "not a valid baseline"),
        (lambda d: d["arrays"].pop("tail_mass"), "tail_mass"),
    ],
)
def test_corrupt_baselines_are_refused(tiny_llama, text_file, tmp_path, damage, message):
    ids = tokenize_text(tiny_llama.tokenizer, text_file.read_text())
    _, stats = compare(None, tiny_llama.model, ids, seq_len=SEQ, max_windows=2, record=True)
    data = json.loads(json.dumps(baseline_json(stats, {})))
    damage(data)
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidInputError, match=message):
        read_baseline(path)


def test_thresholds_decide_pass_and_fail():
    from compressor.evaluate import Comparison

    c = Comparison(perplexity=12.0, reference_perplexity=10.0, kl=0.2, top1_agreement=0.8, tokens=10, windows=1, seq_len=11, seconds=0)
    verdicts = {m.name: m.passed for m in judge(c, Thresholds(max_ppl_ratio=1.2, max_kl=0.19, min_top1=0.8))}
    assert verdicts == {"perplexity_original": True, "perplexity": True, "ppl_ratio": True, "kl": False, "top1_agreement": True}
    assert not MetricCheck("top1", "t", 0.79, 0.8, at_most=False).passed
    assert all(m.passed for m in judge(c, Thresholds()))


@pytest.mark.parametrize("kwargs", [{"max_ppl_ratio": 0}, {"max_kl": -1}, {"min_top1": 1.5}, {"max_kl": float("nan")}])
def test_bad_thresholds_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        Thresholds(**kwargs)


def test_cli_fails_a_bad_model_and_writes_junit(capsys, tiny_llama, badly, text_file, tmp_path):
    _, bad = badly
    junit, report = tmp_path / "junit.xml", tmp_path / "check.json"
    code, out, err = _run(
        capsys, "check", tiny_llama.path, bad, "--data", text_file, "--seq-len", SEQ, "--max-windows", 4,
        "--max-kl", 1e-4, "--min-top1", 0.5, "--max-ppl-ratio", 10, "--junit", junit, "--json", report,
    )
    assert code == 1, err
    assert "check failed" in err and "kl" in err
    suite = ET.parse(junit).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"perplexity_original", "perplexity", "ppl_ratio", "kl", "top1_agreement"}
    failed = {name for name, c in cases.items() if c.find("failure") is not None}
    result = json.loads(report.read_text())
    assert failed == set(result["failed"]) and "kl" in failed
    assert suite.get("failures") == str(len(failed))
    assert result["metrics"]["kl"]["value"] > 1e-4 and result["passed"] is False


def test_cli_passes_a_good_model_with_and_without_baseline(capsys, tiny_llama, slightly, text_file, tmp_path):
    _, good = slightly
    base, first, second = tmp_path / "base.json", tmp_path / "live.json", tmp_path / "from-baseline.json"
    gate = ("--max-kl", 0.5, "--min-top1", 0.5, "--max-ppl-ratio", 1.5, "--seq-len", SEQ, "--max-windows", 4)
    code, out, err = _run(capsys, "check", tiny_llama.path, good, "--data", text_file, *gate, "--save-baseline", base, "--json", first)
    assert code == 0, err
    assert "check passed: 3 thresholds held" in out
    code, out, err = _run(capsys, "check", tiny_llama.path, good, "--data", text_file, *gate, "--baseline", base, "--json", second)
    assert code == 0, err
    live, cached = json.loads(first.read_text()), json.loads(second.read_text())
    assert cached["metrics"]["perplexity_original"]["value"] == pytest.approx(live["metrics"]["perplexity_original"]["value"])
    assert cached["metrics"]["top1_agreement"]["value"] == live["metrics"]["top1_agreement"]["value"]
    assert (live["kl_method"], cached["kl_method"]) == ("exact", "estimated")


def test_cli_baseline_only_run(capsys, tiny_llama, text_file, tmp_path):
    base = tmp_path / "base.json"
    report = tmp_path / "run.json"
    code, out, err = _run(capsys, "check", tiny_llama.path, "--data", text_file, "--seq-len", SEQ, "--max-windows", 2, "--save-baseline", base, "--json", report)
    assert code == 0, err
    assert json.loads(report.read_text())["saved_baseline"] == str(base)
    stats, meta = read_baseline(base)
    assert (stats.windows, stats.seq_len) == (2, SEQ) and meta["model"] == str(tiny_llama.path.resolve())


def test_cli_refuses_before_loading(capsys, text_file, tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = _run(capsys, "check", missing, missing, "--data", text_file, "--min-top1", 2)
    assert code == 2 and "--min-top1" in err
    code, _, err = _run(capsys, "check", missing, "--data", text_file)
    assert code == 2 and "--save-baseline" in err
    code, _, err = _run(capsys, "check", missing, "--data", text_file, "--save-baseline", tmp_path / "b.json", "--max-kl", 1)
    assert code == 2 and "COMPRESSED" in err
    code, _, err = _run(capsys, "check", missing, missing, "--data", text_file, "--baseline", tmp_path / "nothing.json")
    assert code == 3 and "baseline" in err


@pytest.mark.real
def test_smollm2_gate_fails_2_bit_and_passes_8_bit(capsys, smollm2, wikitext_test, tmp_path):
    """The done-when of `compress check`: a deliberately bad model (RTN 2-bit) turns CI red, a
    good one (RTN 8-bit) passes, with the same thresholds and a JUnit file each time; the second
    run reads the original's baseline instead of running it."""
    from compressor.options import QuantizeOptions

    gate = ("--data", wikitext_test, "--seq-len", 256, "--max-windows", 2, "--max-ppl-ratio", 1.05, "--max-kl", 0.05, "--min-top1", 0.9)
    models = {}
    for bits in (2, 8):
        models[bits] = tmp_path / f"w{bits}"
        api.quantize(smollm2.source, QuantizeOptions(bits=bits, sym=bits == 8), output=models[bits])
    base = tmp_path / "smollm2.baseline.json"
    code, out, err = _run(capsys, "check", smollm2.source, models[8], *gate, "--save-baseline", base, "--junit", tmp_path / "w8.xml")
    assert code == 0, err
    code, out, err = _run(capsys, "check", smollm2.source, models[2], *gate, "--baseline", base, "--junit", tmp_path / "w2.xml")
    assert code == 1, err
    for name, failures in (("w8.xml", "0"), ("w2.xml", "3")):
        assert ET.parse(tmp_path / name).getroot().get("failures") == failures


def test_cli_applies_the_adapter_to_the_compressed_model(capsys, tiny_llama, text_file, tmp_path):
    """The original against itself is a perfect match; with an adapter on the second copy it is not."""
    from compressor.formats.adapter import LowRankTerm, save_adapter

    generator = torch.Generator().manual_seed(3)
    adapter = tmp_path / "adapter"
    terms = {
        f"model.layers.{i}.mlp.down_proj": LowRankTerm(torch.randn(64, 4, generator=generator), torch.randn(4, 128, generator=generator))
        for i in range(2)
    }
    save_adapter(adapter, terms, base_model=str(tiny_llama.path))
    results = {}
    for name, extra in (("plain", ()), ("adapted", ("--adapter", adapter))):
        report = tmp_path / f"{name}.json"
        code, _, err = _run(capsys, "check", tiny_llama.path, tiny_llama.path, "--data", text_file, "--seq-len", SEQ, "--max-windows", 3, "--json", report, *extra)
        assert code == 0, err
        results[name] = json.loads(report.read_text())["metrics"]
    assert results["plain"]["kl"]["value"] == pytest.approx(0.0, abs=1e-7)
    assert results["adapted"]["kl"]["value"] > 1e-4
