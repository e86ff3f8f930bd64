"""Compensation: the EoRA closed form, the layer loop, the PEFT adapter and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import api
from compressor.calibration.sources import CalibrationInfo, CalibrationSet
from compressor.cli import run
from compressor.compensate import compensate_model, correction
from compressor.errors import InvalidInputError, UsageError
from compressor.formats.adapter import SERVING_RANKS, apply_adapter, read_adapter, save_adapter
from compressor.loading import LoadedModel
from compressor.options import CalibrationOptions, CompensateOptions
from compressor.targets import select_targets

from conftest import build_model


def _eora_reference(delta: torch.Tensor, gram: torch.Tensor, rank: int, floor: float = 1e-12) -> torch.Tensor:
    """EoRA as its paper writes it: SVD of ΔW·Q·Λ^½, mapped back by Λ^-½·Qᵀ (eigenvalues clamped)."""
    lam, q = torch.linalg.eigh(gram)
    lam = lam.clamp_min(floor * float(lam.max()))
    u, s, vh = torch.linalg.svd(delta @ q * lam.sqrt(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ (vh[:rank] / lam.sqrt() @ q.T)


def _weighted_error(delta: torch.Tensor, x: torch.Tensor) -> float:
    return float((delta @ x.T).square().sum())


@pytest.mark.parametrize("out_features,in_features", [(24, 40), (40, 24)])
def test_eora_equals_closed_form_optimum(out_features, in_features):
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    x = torch.randn(200, in_features, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, in_features, dtype=torch.float64)
    gram = x.T @ x
    for rank in (1, 5, 12):
        term = correction(delta, rank, gram=gram, dtype=torch.float64)
        ours = term.b.double() @ term.a.double()
        reference = _eora_reference(delta, gram, rank)
        # the optimum of min ‖(ΔW − B·A)·Xᵀ‖ under rank r: the tail of the whitened spectrum
        sv = torch.linalg.svdvals(delta @ torch.linalg.cholesky(gram))
        optimum = float(sv[rank:].square().sum())
        assert _weighted_error(delta - ours, x) == pytest.approx(optimum, rel=1e-5)
        assert _weighted_error(delta - reference, x) == pytest.approx(optimum, rel=1e-5)
        assert torch.allclose(ours, reference, atol=1e-4)  # full-rank Gram: the same product
        assert _weighted_error(delta - ours, x) <= _weighted_error(delta, x)


def test_rank_deficient_gram_stays_finite_and_never_worse():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(32, 48, generator=g, dtype=torch.float64)
    x = torch.randn(10, 48, generator=g, dtype=torch.float64)  # 10 samples: Gram of rank 10
    x[:, 5] = 0  # a dead input channel
    gram = x.T @ x
    gram[0, 0] -= 1e-9  # a slightly negative eigenvalue, as summed low-precision products give
    for rank in (4, 10, 20):
        term = correction(delta, rank, gram=gram, dtype=torch.float64)
        assert torch.isfinite(term.a).all() and torch.isfinite(term.b).all()
        after = _weighted_error(delta - term.b.double() @ term.a.double(), x)
        assert after <= _weighted_error(delta, x) * (1 + 1e-9)
        assert after <= _weighted_error(delta - _eora_reference(delta, gram, rank), x) * (1 + 1e-6) + 1e-9


def test_fisher_weighting_minimizes_weighted_error():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(16, 24, generator=g, dtype=torch.float64)
    x = torch.randn(100, 24, generator=g, dtype=torch.float64)
    d = torch.rand(16, generator=g, dtype=torch.float64) + 0.1
    term = correction(delta, 4, gram=x.T @ x, scale=d, dtype=torch.float64)
    weighted = lambda m: float((d[:, None] * m @ x.T).square().sum())  # noqa: E731
    ours = weighted(delta - term.b.double() @ term.a.double())
    sv = torch.linalg.svdvals(d[:, None] * delta @ x.T)
    assert ours == pytest.approx(float(sv[4:].square().sum()), rel=1e-6)
    plain = correction(delta, 4, gram=x.T @ x, dtype=torch.float64)
    assert ours <= weighted(delta - plain.b.double() @ plain.a.double())


def _damaged(model, seed: int = 0, kind: str = "round"):
    """A copy of ``model`` with its block linears rounded coarsely (a stand-in for quantization) or
    half their weights zeroed (pruning)."""
    damaged = build_model(model.config.model_type if model.config.model_type != "gpt2" else "gpt2", seed)
    damaged.load_state_dict(model.state_dict())
    with torch.no_grad():
        for t in select_targets(damaged):
            w = t.module.weight
            if kind == "round":
                step = float(w.abs().max()) / 3
                w.copy_((w / step).round() * step)
            else:
                w.mul_(w.abs() > w.abs().median())
    return damaged.eval()


def _windows(n: int = 4, seq: int = 32, seed: int = 0) -> CalibrationSet:
    ids = torch.randint(3, 300, (n, seq), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, CalibrationInfo("test", n, seq, seed, n * seq))


def _logit_error(model, reference, ids) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - reference(input_ids=ids).logits).square().mean())


@pytest.mark.parametrize("method,alloc,sequential", [
    ("eora", "uniform", True), ("eora", "uniform", False), ("fisher", "global", True), ("fisher", "uniform", False),
    ("svd", "uniform", False), ("eora", "global", False),
])
def test_compensation_reduces_damage(tiny_llama, method, alloc, sequential):
    original = tiny_llama.model
    damaged = _damaged(original)
    targets = select_targets(damaged)
    options = CompensateOptions(rank=8, method=method, alloc=alloc, sequential=sequential, calib_dtype="float32")
    outcome = compensate_model(original, damaged, targets, options, _windows())
    params = sum(8 * sum(t.shape) for t in targets)
    assert outcome.adapter_params <= params
    if alloc == "uniform":
        assert all(m.rank == 8 for m in outcome.modules)
    else:
        assert outcome.adapter_params >= params - max(sum(t.shape) for t in targets)  # the budget is spent
    assert all(m.remaining <= m.energy * (1 + 1e-6) for m in outcome.modules)
    ids = _windows(2, 32, seed=5).input_ids  # held out
    before = _logit_error(damaged, original, ids)
    apply_adapter(damaged, read_adapter_from(outcome.corrections))
    assert _logit_error(damaged, original, ids) < before


def read_adapter_from(terms):
    from compressor.formats.adapter import Adapter

    return Adapter(terms, None)


def test_compensated_layer_error_is_the_predicted_one(tiny_llama):
    """One-shot: each module's measured calibration-weighted error after correction equals the
    prediction (the tail of its whitened spectrum), and is below the error before."""
    from compressor.pipeline import iterate_blocks

    original = tiny_llama.model
    damaged = _damaged(original, kind="prune")
    targets = select_targets(damaged)
    windows = _windows()
    outcome = compensate_model(original, damaged, targets, CompensateOptions(rank=4, method="eora", sequential=False, calib_dtype="float32"), windows)
    originals = dict(original.named_modules())
    for step in iterate_blocks(damaged, windows.batches(2), targets, compute_dtype=None):
        grams = step.collect_grams(block_final=True)
        for t in step.targets:
            gram = grams[t.name].matrix
            delta = originals[t.name].weight.double() - t.weight().double()
            term = outcome.corrections[t.name]
            left = delta - term.b.double() @ term.a.double()
            measured = float(torch.trace(left @ gram @ left.T).detach())
            result = next(m for m in outcome.modules if m.name == t.name)
            assert measured == pytest.approx(result.remaining, rel=1e-4, abs=1e-8)
            assert measured < float(torch.trace(delta @ gram @ delta.T).detach())


@pytest.fixture(scope="module")
def damaged_llama(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged-llama")
    _damaged(tiny_llama.model).save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_peft_loads_the_adapter_with_our_logits(kind, request, tmp_path):
    peft = pytest.importorskip("peft")
    tiny = request.getfixturevalue(f"tiny_{kind}")
    damaged = _damaged(tiny.model)
    folder = tmp_path / "damaged"
    damaged.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    for alloc in ("uniform", "global"):
        adapter = tmp_path / f"adapter-{alloc}"
        api.compensate(tiny.path, folder, CompensateOptions(rank=4, alloc=alloc, serve_form=False), _windows(), output=adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["bias"] == "none"
        if alloc == "uniform":
            assert config["r"] == 4 and config["lora_alpha"] == 4 and config["rank_pattern"] == {}
        ours = api.loading.load_model(str(folder)).model
        apply_adapter(ours, read_adapter(adapter))
        base = api.loading.load_model(str(folder)).model
        theirs = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
        ids = _windows(2, 24, seed=3).input_ids
        with torch.no_grad():
            want, got = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        assert torch.allclose(want, got, atol=1e-5), alloc
        for name, module in theirs.named_modules():  # PEFT read each module's own rank
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                target = name.removeprefix("base_model.model.")
                assert module.lora_A["default"].weight.shape[0] == read_adapter(adapter).terms[target].rank


def test_serving_form_gives_the_exact_form_logits(tiny_llama, damaged_llama, tmp_path):
    exact, serve = tmp_path / "exact", tmp_path / "serve"
    options = CompensateOptions(rank=4, alloc="global", method="fisher")
    result = api.compensate(tiny_llama.path, damaged_llama, options, _windows(), output=exact)
    ranks = {m.rank for m in result.outcome.modules}
    assert len(ranks) > 1  # the test needs ranks that differ
    api.compensate(tiny_llama.path, damaged_llama, CompensateOptions(rank=4, alloc="global", method="fisher", serve_form=True), _windows(), output=serve)
    config = json.loads((serve / "adapter_config.json").read_text())
    assert config["r"] in SERVING_RANKS and config["r"] >= max(ranks)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["lora_alpha"] == config["r"]
    exact_config = json.loads((exact / "adapter_config.json").read_text())
    assert exact_config["rank_pattern"]
    ids = _windows(2, 24, seed=4).input_ids
    logits = []
    for adapter in (exact, serve):
        model = api.loading.load_model(str(damaged_llama)).model
        apply_adapter(model, read_adapter(adapter))
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_compensating_a_factored_checkpoint(tiny_llama, tmp_path):
    from compressor.options import FactorizeOptions

    factored = tmp_path / "factored"
    api.factorize(tiny_llama.path, FactorizeOptions(target=0.6, method="whiten", alloc="uniform"), _windows(), output=factored)
    adapter = tmp_path / "adapter"
    result = api.compensate(tiny_llama.path, factored, CompensateOptions(rank=4), _windows(), output=adapter)
    assert len(result.outcome.corrections) == len(select_targets(tiny_llama.model))
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(3000)))
    plain = api.evaluate(str(factored), text, seq_len=32, max_windows=4)
    corrected = api.evaluate(str(factored), text, seq_len=32, max_windows=4, adapter=adapter)
    assert corrected.perplexity != plain.perplexity  # the hooks on the factored modules ran


def test_compensating_a_pruned_checkpoint_brings_logits_back(tiny_llama, tmp_path, text_file):
    from compressor.calibration.sources import read_text, tokenize_text

    pruned = tmp_path / "pruned"
    _damaged(tiny_llama.model, kind="prune").save_pretrained(pruned)
    tiny_llama.tokenizer.save_pretrained(pruned)
    adapter = tmp_path / "adapter"
    api.compensate(tiny_llama.path, pruned, CompensateOptions(rank=16), CalibrationOptions(str(text_file), 16, 32), output=adapter)
    ids = tokenize_text(tiny_llama.tokenizer, read_text(text_file))[-4 * 32 :].view(4, 32)  # the text's end: mostly unseen
    plain = api.loading.load_model(str(pruned)).model
    corrected = api.loading.load_model(str(pruned)).model
    apply_adapter(corrected, read_adapter(adapter))
    assert _logit_error(corrected, tiny_llama.model, ids) < 0.7 * _logit_error(plain, tiny_llama.model, ids)


def test_bad_rank_fails_before_any_work(tiny_llama, damaged_llama, tmp_path, monkeypatch):
    assert run(["compensate", str(tiny_llama.path), str(damaged_llama), "--rank", "0", "-o", str(tmp_path / "a")]) == 2
    loads = []
    real = api.loading.load_model
    monkeypatch.setattr(api.loading, "load_model", lambda spec, *a, **k: loads.append(spec) or real(spec, *a, **k))
    # 33 > min(out, in) = 32 of the k/v projections
    assert run(["compensate", str(tiny_llama.path), str(damaged_llama), "--rank", "33", "-o", str(tmp_path / "a")]) == 2
    assert loads == [str(damaged_llama)]  # the original was never loaded
    assert not (tmp_path / "a").exists()
    with pytest.raises(UsageError):
        CompensateOptions(rank=4, method="nope")


def test_mismatched_models_and_adapters_are_invalid_input(tiny_llama, tiny_qwen2, damaged_llama, tmp_path, text_file):
    with pytest.raises(InvalidInputError, match="do not match"):
        gpt = build_model("gpt2")
        compensate_model(gpt, tiny_llama.model, select_targets(tiny_llama.model), CompensateOptions(rank=2), _windows())
    adapter = tmp_path / "adapter"
    api.compensate(tiny_llama.path, damaged_llama, CompensateOptions(rank=2), _windows(), output=adapter)
    # a module the base lacks, and shapes that differ
    gpt2_folder = tmp_path / "gpt2"
    build_model("gpt2").save_pretrained(gpt2_folder)
    tiny_llama.tokenizer.save_pretrained(gpt2_folder)
    assert run(["eval", str(gpt2_folder), "--data", str(text_file), "--seq-len", "16", "--adapter", str(adapter)]) == 3
    terms = read_adapter(adapter).terms
    name = next(iter(terms))
    bad = tmp_path / "bad"
    save_adapter(bad, {name: type(terms[name])(terms[name].b[:-1], terms[name].a)}, base_model=None)
    assert run(["eval", str(damaged_llama), "--data", str(text_file), "--seq-len", "16", "--adapter", str(bad)]) == 3
    assert run(["eval", str(damaged_llama), "--data", str(text_file), "--seq-len", "16", "--adapter", str(tmp_path / "none")]) == 3


def test_cli_compensate_then_eval(tiny_llama, damaged_llama, tmp_path, text_file):
    adapter = tmp_path / "adapter"
    report = tmp_path / "report.json"
    code = run([
        "compensate", str(tiny_llama.path), str(damaged_llama), "--rank", "4", "--calib", str(text_file),
        "--calib-samples", "4", "--seq-len", "32", "-o", str(adapter), "--json", str(report),
    ])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["options"]["rank"] == 4 and data["adapter_params"] > 0
    assert (adapter / "adapter_model.safetensors").is_file()
    assert run(["eval", str(damaged_llama), "--data", str(text_file), "--seq-len", "32", "--max-windows", "2", "--adapter", str(adapter)]) == 0
    assert run(["compensate", str(tiny_llama.path), str(damaged_llama), "--rank", "4", "--calib", str(text_file), "-o", str(adapter)]) == 2
