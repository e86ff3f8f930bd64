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
    model = api.loading.load_model(str(factored)).model
    assert {t.kind for t in select_targets(model, factored=True)} == {"factored"}  # the corrections go through hooks
    ids = _windows(2, 32, seed=5).input_ids  # held out
    before = _logit_error(model, tiny_llama.model, ids)
    apply_adapter(model, read_adapter(adapter))
    assert _logit_error(model, tiny_llama.model, ids) < 0.9 * before


def test_compensating_a_pruned_checkpoint_brings_logits_back(tiny_llama, tmp_path, text_file):
    from compressor.calibration.sources import read_text, tokenize_text

    pruned = tmp_path / "pruned"
    _damaged(tiny_llama.model, kind="prune").save_pretrained(pruned)
    tiny_llama.tokenizer.save_pretrained(pruned)
    adapter = tmp_path / "adapter"
    api.compensate(tiny_llama.path, pruned, CompensateOptions(rank=16), CalibrationOptions(str(text_file), 16, 32), output=adapter)
    ids = tokenize_text(tiny_llama.tokenizer, read_text(text_file))[-4 * 32 :].view(4, 32)  # the text's end: mostly unseen
    import compressor

    plain, _ = compressor.load(pruned)  # an ordinary checkpoint loads through the public entry too
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


def test_mismatched_models_and_adapters_are_invalid_input(tiny_llama, damaged_llama, tmp_path, text_file, capsys):
    with pytest.raises(InvalidInputError, match="do not match"):
        gpt = build_model("gpt2")
        compensate_model(gpt, tiny_llama.model, select_targets(tiny_llama.model), CompensateOptions(rank=2), _windows())
    adapter = tmp_path / "adapter"
    api.compensate(tiny_llama.path, damaged_llama, CompensateOptions(rank=2), _windows(), output=adapter)
    # a module the base lacks, and shapes that differ
    gpt2_folder = tmp_path / "gpt2"
    build_model("gpt2").save_pretrained(gpt2_folder)
    tiny_llama.tokenizer.save_pretrained(gpt2_folder)
    capsys.readouterr()

    def error_of(model, adapter_folder) -> str:
        assert run(["eval", str(model), "--data", str(text_file), "--seq-len", "16", "--adapter", str(adapter_folder)]) == 3
        return capsys.readouterr().err

    assert "the adapter does not fit the model: no linear module model.layers.0." in error_of(gpt2_folder, adapter)
    terms = read_adapter(adapter).terms
    name = next(iter(terms))
    out_features, in_features = terms[name].shape
    bad = tmp_path / "bad"
    save_adapter(bad, {name: type(terms[name])(terms[name].b[:-1], terms[name].a)}, base_model=None)
    expected = f"shapes (out, in) differ, adapter vs model: {name} ({out_features - 1}, {in_features}) vs ({out_features}, {in_features})"
    assert expected in error_of(damaged_llama, bad)
    assert f"adapter folder not found: {tmp_path / 'none'}" in error_of(damaged_llama, tmp_path / "none")


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


def test_serving_form_pads_rank_4_to_8_with_the_same_logits(tiny_llama, damaged_llama, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    serve, exact = tmp_path / "serve", tmp_path / "exact"
    result = api.compensate(tiny_llama.path, damaged_llama, CompensateOptions(rank=4, method="eora"), _windows(), output=serve)
    config = json.loads((serve / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (8, 8, {}, {})
    for key, tensor in load_file(str(serve / "adapter_model.safetensors")).items():
        padding = tensor[4:] if ".lora_A." in key else tensor[:, 4:]
        assert tensor.shape[0 if ".lora_A." in key else 1] == 8 and not padding.any(), key
    save_adapter(exact, result.outcome.corrections, base_model=None, serve_form=False)
    assert json.loads((exact / "adapter_config.json").read_text())["r"] == 4
    ids = _windows(2, 24, seed=4).input_ids
    logits = []
    for adapter in (exact, serve):
        model = api.loading.load_model(str(damaged_llama)).model
        apply_adapter(model, read_adapter(adapter))
        logits.append(model(input_ids=ids).logits.detach())
    theirs = peft.PeftModel.from_pretrained(api.loading.load_model(str(damaged_llama)).model, str(serve)).eval()
    with torch.no_grad():
        logits.append(theirs(input_ids=ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    assert torch.allclose(logits[0], logits[2], atol=1e-5)


def _fake_targets(size: int = 1024):
    """Targets of a width the tiny models lack, on the meta device (no memory)."""
    from torch import nn

    from compressor.targets import Target

    return [Target(f"model.layers.{i}.mlp.down_proj", nn.Linear(size, size, bias=False, device="meta"), i, "linear") for i in range(2)]


def test_serving_rank_above_512_is_refused_before_any_work():
    from compressor.compensate import check_targets

    targets = _fake_targets()
    for serve_form in (True, None):  # None: the serving form, since uniform ranks are all the same
        with pytest.raises(UsageError, match=r"ranks up to 600 exceed the largest rank serving engines accept \(512\).*--exact-form"):
            check_targets(CompensateOptions(rank=600, serve_form=serve_form), targets)
    check_targets(CompensateOptions(rank=600, serve_form=False), targets)
    check_targets(CompensateOptions(rank=512, serve_form=True), targets)
    # --alloc global: up to 4 × the average rank, capped by min(out, in)
    with pytest.raises(UsageError, match="ranks up to 800 exceed"):
        check_targets(CompensateOptions(rank=200, alloc="global", serve_form=True), targets)
    check_targets(CompensateOptions(rank=128, alloc="global", serve_form=True), targets)
    check_targets(CompensateOptions(rank=200, alloc="global"), targets)  # ranks that differ: the exact form


def test_targets_outside_the_blocks_need_svd_uniform(tiny_llama, damaged_llama, tmp_path):
    for method, alloc in (("eora", "uniform"), ("fisher", "uniform"), ("svd", "global")):
        with pytest.raises(UsageError, match="lm_head lie outside the transformer blocks"):
            api.compensate(tiny_llama.path, damaged_llama, CompensateOptions(rank=4, method=method, alloc=alloc), _windows(),
                           include=["lm_head"], output=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    original = tiny_llama.model
    damaged = _damaged(original)
    with torch.no_grad():
        damaged.lm_head.weight.mul_(damaged.lm_head.weight.abs() > damaged.lm_head.weight.abs().median())
    targets = select_targets(damaged, include=["lm_head", "model.layers.0.mlp.down_proj"])
    outcome = compensate_model(original, damaged, targets, CompensateOptions(rank=4, method="svd"), None)
    delta = (original.lm_head.weight - damaged.lm_head.weight).detach().double()
    term = outcome.corrections["lm_head"]
    optimum = float(torch.linalg.svdvals(delta)[4:].square().sum())  # plain SVD: the Frobenius optimum
    assert float((delta - term.b.double() @ term.a.double()).square().sum()) == pytest.approx(optimum, rel=1e-5)
    assert next(m for m in outcome.modules if m.name == "lm_head").remaining == pytest.approx(optimum, rel=1e-5)


def test_gpt2_conv1d_adapter_loads_in_peft_with_our_logits(tiny_gpt2, tmp_path):
    peft = pytest.importorskip("peft")
    folder, adapter = tmp_path / "damaged", tmp_path / "adapter"
    _damaged(tiny_gpt2.model).save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    api.compensate(tiny_gpt2.path, folder, CompensateOptions(rank=4, method="eora"), _windows(), output=adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    ids = _windows(2, 24, seed=3).input_ids
    ours = api.loading.load_model(str(folder)).model
    before = _logit_error(ours, tiny_gpt2.model, ids)
    apply_adapter(ours, read_adapter(adapter))
    assert _logit_error(ours, tiny_gpt2.model, ids) < before
    theirs = peft.PeftModel.from_pretrained(api.loading.load_model(str(folder)).model, str(adapter)).eval()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)


def test_sequential_calibrates_each_block_after_the_corrected_ones(tiny_llama):
    """Sequential: each module's measured calibration-weighted error, on Grams re-collected with
    the corrections of the earlier blocks applied, equals the prediction; on the uncorrected
    model's Grams it would not (block 1)."""
    from compressor.formats.adapter import terms_applied
    from compressor.pipeline import CALIBRATION_BATCH, iterate_blocks

    original = tiny_llama.model
    damaged = _damaged(original, kind="prune")
    targets = select_targets(damaged)
    windows = _windows()
    options = CompensateOptions(rank=4, method="eora", sequential=True, calib_dtype="float32")
    outcome = compensate_model(original, damaged, targets, options, windows)
    results = {m.name: m for m in outcome.modules}
    block_of = {t.name: t.block_index for t in targets}
    originals = dict(original.named_modules())

    def grams_of(block: int, terms: dict) -> dict:
        grams = {}
        with terms_applied(damaged, terms):
            for step in iterate_blocks(damaged, windows.batches(CALIBRATION_BATCH), [t for t in targets if t.block_index == block]):
                grams = step.collect_grams(block_final=True)
        return {name: g.matrix for name, g in grams.items()}

    def error(name: str, gram: torch.Tensor) -> float:
        delta = (originals[name].weight - damaged.get_submodule(name).weight).detach().double()
        term = outcome.corrections[name]
        left = delta - term.b.double() @ term.a.double()
        return float(torch.trace(left @ gram @ left.T))

    assert sorted(set(block_of.values())) == [0, 1]
    for block in (0, 1):
        earlier = {name: term for name, term in outcome.corrections.items() if block_of[name] < block}
        assert len(earlier) == (0 if block == 0 else 7)
        for name, gram in grams_of(block, earlier).items():
            assert error(name, gram) == pytest.approx(results[name].remaining, rel=1e-5, abs=1e-10), name
            assert results[name].remaining < results[name].energy
    one_shot = grams_of(1, {})  # measured 1e-3 to 0.24 away from the prediction
    assert any(abs(error(name, gram) - results[name].remaining) > 1e-2 * results[name].remaining for name, gram in one_shot.items())
