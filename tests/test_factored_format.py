"""The factored checkpoint: FactoredLinear, apply_factors, save_factored → stock from_pretrained,
strict loading, dense export and atomic writing, on tiny random LLaMA / Qwen2 / GPT-2 / BERT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import compressor
import compressor.api
from compressor.errors import InvalidInputError, UsageError
from compressor.formats import (
    FORMAT_VERSION,
    QUANT_METHOD,
    FactoredLinear,
    LowRankConfig,
    apply_factors,
    atomic_dir,
    export_dense,
    factored_modules,
    load_factored,
    save_factored,
)
from compressor.targets import select_targets
from conftest import VOCAB, build_model

KINDS = ["llama", "qwen2", "gpt2", "bert"]
RANK = 8
METADATA = {"method": "svd", "target": "blocks", "calibration": {"source": "none", "windows": 0}}


def _auto(kind: str):
    return transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM


@torch.no_grad()
def _outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None else out.logits


def _ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 12), generator=g)


def _svd_factors(model: nn.Module, rank: int = RANK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Plain SVD truncation of every block target: B = U·√S, A = √S·Vᵀ."""
    factors = {}
    for t in select_targets(model):
        u, s, vh = torch.linalg.svd(t.weight().to(torch.float64), full_matrices=False)
        root = s[:rank].sqrt()
        factors[t.name] = ((u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float())
    return factors


def _factored_model(kind: str, seed: int = 0):
    model = build_model(kind, seed=seed)
    factors = _svd_factors(model)
    apply_factors(model, factors)
    return model, factors


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    """(kind, in-memory factored model, its factors, saved folder) per architecture."""
    kind = request.param
    model, factors = _factored_model(kind)
    out = save_factored(model, None, tmp_path_factory.mktemp(f"factored-{kind}") / "out", METADATA)
    return kind, model, factors, out


def _copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _safetensors_keys(folder: Path) -> dict[str, dict]:
    """file name → {"keys": [...], "metadata": {...}} for every safetensors file in the folder."""
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found[path.name] = {"keys": list(f.keys()), "metadata": f.metadata()}
    return found


# ------------------------------------------------------------------------------------------
# FactoredLinear and apply_factors


def test_factored_linear_computes_b_times_a():
    torch.manual_seed(0)
    b, a, bias = torch.randn(24, 5), torch.randn(5, 16), torch.randn(24)
    layer = FactoredLinear.from_factors(b, a, bias)
    assert (layer.in_features, layer.out_features, layer.rank) == (16, 24, 5)
    assert layer.weight_a.shape == (5, 16) and layer.weight_b.shape == (24, 5)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), F.linear(x, b @ a, bias), atol=1e-5, rtol=1e-5)
    # copies, not views of the caller's tensors
    assert layer.weight_a.data_ptr() != a.data_ptr()

    fresh = FactoredLinear(16, 24, 5, bias=False, dtype=torch.bfloat16)
    assert fresh.bias is None and fresh.weight_a.dtype == torch.bfloat16
    assert fresh(torch.randn(2, 16, dtype=torch.bfloat16)).shape == (2, 24)

    empty = FactoredLinear.from_factors(torch.zeros(24, 0), torch.zeros(0, 16), bias)
    torch.testing.assert_close(empty(x), bias.expand(3, 7, 24))


@pytest.mark.parametrize("kind", KINDS)
def test_in_memory_factored_model_matches_hand_made_dense_reference(kind):
    model, factors = _factored_model(kind)
    reference = build_model(kind)  # same seed: same weights before factoring
    with torch.no_grad():
        for name, (b, a) in factors.items():
            module = reference.get_submodule(name)
            dense = b @ a
            module.weight.copy_(dense.t() if isinstance(module, Conv1D) else dense)
    ids = _ids()
    torch.testing.assert_close(_outputs(model, ids), _outputs(reference, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_outputs(model, ids), _outputs(build_model(kind), ids), atol=1e-3)
    # every target replaced, the bias kept as the same values, orientation recorded
    original = build_model(kind)
    for name in factors:
        layer = model.get_submodule(name)
        assert isinstance(layer, FactoredLinear) and layer.rank == RANK
        assert layer.transposed_origin == (kind == "gpt2")
        old = original.get_submodule(name)
        if old.bias is not None:
            torch.testing.assert_close(layer.bias, old.bias)
        else:
            assert layer.bias is None


def test_one_layer_by_hand_gpt2_conv1d():
    model = build_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn  # Conv1D: weight (in=64, out=192)
    x = torch.randn(2, 5, 64)
    b, a = _svd_factors(model)["transformer.h.0.attn.c_attn"]
    expected = x @ (b @ a).t() + conv.bias.detach()
    apply_factors(model, {"transformer.h.0.attn.c_attn": (b, a)})
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_apply_factors_checks_everything_before_changing_anything():
    model = build_model("llama")
    good = _svd_factors(model)
    q = "model.layers.0.self_attn.q_proj"
    bad = {q: good[q], "model.layers.0.self_attn.k_proj": good[q]}  # k is 32×64, q's factors 64×64
    with pytest.raises(ValueError, match="k_proj"):
        apply_factors(model, bad)
    assert isinstance(model.get_submodule(q), nn.Linear)
    with pytest.raises(KeyError, match="nope"):
        apply_factors(model, {"model.nope": good[q]})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        apply_factors(model, {"model.norm": good[q]})


def test_apply_factors_refuses_a_tied_weight():
    from conftest import _llama_config

    config = _llama_config()
    config.tie_word_embeddings = True
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied"):
        apply_factors(model, {"lm_head": (torch.zeros(VOCAB, 4), torch.zeros(4, 64))})


def test_apply_factors_casts_to_the_layer_dtype_and_keeps_its_bias():
    model = build_model("qwen2").to(torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    bias = q.bias
    apply_factors(model, {"model.layers.0.self_attn.q_proj": (torch.randn(64, 4), torch.randn(4, 64))})
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight_a.dtype == layer.weight_b.dtype == torch.bfloat16
    assert layer.bias is bias


# ------------------------------------------------------------------------------------------
# Save → stock from_pretrained


def test_stock_from_pretrained_rebuilds_factored_modules(saved):
    kind, model, factors, out = saved
    loaded, info = _auto(kind).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert isinstance(loaded.hf_quantizer, compressor.formats.LowRankQuantizer)
    assert {n: m.rank for n, m in factored_modules(loaded).items()} == {n: RANK for n in factors}
    assert all(m.transposed_origin == (kind == "gpt2") for m in factored_modules(loaded).values())
    ids = _ids(1)
    torch.testing.assert_close(_outputs(loaded, ids), _outputs(model, ids), atol=1e-6, rtol=0)
    # the factors really arrived: a fresh model of the same config computes something else
    fresh = build_model(kind, seed=99)
    assert not torch.allclose(_outputs(loaded, ids), _outputs(fresh, ids), atol=1e-3)


def test_load_factored_is_strict_and_equal(saved):
    kind, model, factors, out = saved
    loaded, tokenizer = load_factored(out)
    assert tokenizer is None  # saved without one
    assert not loaded.training
    ids = _ids(2)
    torch.testing.assert_close(_outputs(loaded, ids), _outputs(model, ids), atol=1e-6, rtol=0)


def test_saved_files_hold_factors_not_weights(saved):
    kind, model, factors, out = saved
    files = _safetensors_keys(out)
    assert list(files) == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    keys = set(files["model.safetensors"]["keys"])
    assert files["model.safetensors"]["metadata"] == {"format": "pt"}
    for name in factors:
        assert f"{name}.weight_a" in keys and f"{name}.weight_b" in keys
        assert f"{name}.weight" not in keys
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        name = next(iter(factors))
        assert tuple(f.get_tensor(f"{name}.weight_a").shape) == tuple(factors[name][1].shape)
        assert tuple(f.get_tensor(f"{name}.weight_b").shape) == tuple(factors[name][0].shape)
    # modules left dense keep their weight
    tied = set(model.all_tied_weights_keys)  # e.g. GPT-2's lm_head.weight: stored once, as wte.weight
    dense = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D, nn.Embedding))]
    assert dense and all(f"{n}.weight" in keys for n in dense if f"{n}.weight" not in tied)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    assert config["quantization_config"] == {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        **METADATA,
        "ranks": {name: RANK for name in factors},
    }


def test_save_leaves_the_model_as_it_was(saved, tmp_path):
    kind, model, factors, out = saved
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None
    # a loaded factored model saves again, with save_factored and with plain save_pretrained
    loaded, _ = load_factored(out)
    again = save_factored(loaded, None, tmp_path / "again", {"method": "resaved"})
    assert isinstance(loaded.hf_quantizer, compressor.formats.LowRankQuantizer)
    assert json.loads((again / "config.json").read_text())["quantization_config"]["method"] == "resaved"
    loaded.save_pretrained(tmp_path / "plain")
    for folder in (again, tmp_path / "plain"):
        reloaded, _ = load_factored(folder)
        ids = _ids(3)
        torch.testing.assert_close(_outputs(reloaded, ids), _outputs(model, ids), atol=1e-6, rtol=0)


def test_tokenizer_is_saved_and_loaded(tokenizer, tmp_path):
    model, _ = _factored_model("llama")
    out = save_factored(model, tokenizer, tmp_path / "with-tok", METADATA)
    assert (out / "tokenizer.json").is_file()
    loaded, tok = compressor.load(out)
    assert tok is not None and tok("the model").input_ids == tokenizer("the model").input_ids
    assert isinstance(loaded.model.layers[0].mlp.down_proj, FactoredLinear)


def test_tied_embeddings_and_shards_round_trip(tmp_path):
    """SmolLM2 ties lm_head to embed_tokens: the tie survives, and 50KB shards load back."""
    from conftest import _llama_config

    config = _llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    apply_factors(model, _svd_factors(model))
    out = save_factored(model, None, tmp_path / "sharded", METADATA, max_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    keys = {k for f in _safetensors_keys(out).values() for k in f["keys"]}
    assert set(index["weight_map"]) == keys
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert all(f["metadata"] == {"format": "pt"} for f in _safetensors_keys(out).values())
    for loader in (lambda: load_factored(out)[0], lambda: transformers.AutoModelForCausalLM.from_pretrained(out)):
        loaded = loader()
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        ids = _ids(4)
        torch.testing.assert_close(_outputs(loaded, ids), _outputs(model, ids), atol=1e-6, rtol=0)


def test_sharded_gpt2_round_trip(tmp_path):
    model, _ = _factored_model("gpt2")
    out = save_factored(model, None, tmp_path / "g", METADATA, max_shard_size="50KB")
    assert (out / "model.safetensors.index.json").is_file()
    loaded, _ = load_factored(out)
    ids = _ids(5)
    torch.testing.assert_close(_outputs(loaded, ids), _outputs(model, ids), atol=1e-6, rtol=0)


def test_metadata_cannot_override_the_format(tmp_path):
    model, _ = _factored_model("llama")
    with pytest.raises(ValueError, match="ranks"):
        save_factored(model, None, tmp_path / "x", {"ranks": {}})
    with pytest.raises(ValueError, match="JSON"):
        save_factored(model, None, tmp_path / "y", {"calibration": {"when": object()}})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------
# Refusals


def test_refuses_other_quant_methods(saved, tmp_path):
    kind, _, _, out = saved
    folder = _copy(out, tmp_path)
    _edit_config(folder, lambda c: c["quantization_config"].update(quant_method="something_else"))
    with pytest.raises(InvalidInputError, match="something_else"):
        load_factored(folder)
    _edit_config(folder, lambda c: c.pop("quantization_config"))
    with pytest.raises(InvalidInputError, match="no quantization_config"):
        load_factored(folder)


def test_refuses_unknown_format_version(saved, tmp_path):
    kind, _, _, out = saved
    folder = _copy(out, tmp_path)
    _edit_config(folder, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(InvalidInputError, match="format_version 99"):
        load_factored(folder)
    with pytest.raises(ValueError, match="format_version 99"):
        _auto(kind).from_pretrained(folder)


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails a test if transformers builds a model: refusals must come from the headers first,
    whatever a transformers release reports about the keys it loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the folder was validated")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def _rewrite(folder: Path, edit) -> None:
    """Apply ``edit`` to the tensors of a single-file checkpoint and write them back."""
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _first(factors) -> str:
    return next(iter(factors))


BROKEN = {
    # name: (edit of the tensors, edit of the config, the refusal's message)
    "missing factor": (lambda t, f: t.pop(f"{_first(f)}.weight_b"), None, r"missing .*weight_b"),
    "unexpected tensor": (lambda t, f: t.update(extra=torch.zeros(3)), None, r"unexpected tensors: extra"),
    "weight beside its factors": (
        lambda t, f: t.update({f"{_first(f)}.weight": torch.zeros(64, 64)}), None, r"unexpected tensors: .*\.weight"
    ),
    "mis-shaped factor": (
        lambda t, f: t.update({f"{_first(f)}.weight_a": torch.zeros(RANK, 63)}), None, r"weight_a is \[8, 63\], the model needs \[8, 64\]"
    ),
    "mis-shaped dense tensor": (
        lambda t, f: t.update({k: torch.zeros(v.shape[0], v.shape[1] + 1) for k, v in list(t.items()) if k.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))}),
        None,
        r"(embed_tokens|wte|word_embeddings)\.weight is \[320, 65\], the model needs \[320, 64\]",
    ),
    "integer factor": (lambda t, f: t.update({f"{_first(f)}.weight_a": t[f"{_first(f)}.weight_a"].to(torch.int32)}), None, r"weight_a is I32"),
    "rank that does not fit": (
        None, lambda q, f: q["ranks"].update({_first(f): RANK + 1}), rf"records rank {RANK + 1}, its factors have rank {RANK}"
    ),
    "module the model lacks": (None, lambda q, f: q["ranks"].update({"model.nowhere": 2}), r"nowhere"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_refusals_come_from_the_headers_before_any_model_is_built(saved, tmp_path, broken, no_model_built):
    kind, _, factors, out = saved
    folder = _copy(out, tmp_path)
    edit_tensors, edit_qconfig, message = BROKEN[broken]
    if edit_tensors is not None:
        _rewrite(folder, lambda t: edit_tensors(t, factors))
    if edit_qconfig is not None:
        _edit_config(folder, lambda c: edit_qconfig(c["quantization_config"], factors))
    with pytest.raises(InvalidInputError, match=message):
        load_factored(folder)
    with pytest.raises(InvalidInputError, match=message):
        compressor.api.verify(folder)


def test_every_problem_is_named_in_one_message(saved, tmp_path, no_model_built):
    kind, _, factors, out = saved
    folder = _copy(out, tmp_path)
    first, second = list(factors)[:2]
    _rewrite(folder, lambda t: (t.pop(f"{first}.weight_a"), t.update(stray=torch.zeros(1))))
    _edit_config(folder, lambda c: c["quantization_config"]["ranks"].update({second: RANK - 1}))
    with pytest.raises(InvalidInputError) as refused:
        load_factored(folder)
    text = str(refused.value)
    assert f"missing {first}.weight_a" in text and "stray" in text and f"{second}: config.json records rank {RANK - 1}" in text


def test_a_shard_that_does_not_match_its_index_is_refused(tmp_path, no_model_built):
    model, _ = _factored_model("gpt2")
    out = save_factored(model, None, tmp_path / "g", METADATA, max_shard_size="50KB")
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key, file = next(iter(index["weight_map"].items()))
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != file)
    index["weight_map"][key] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(InvalidInputError, match=f"the index puts {key} in {other}, but {file} holds it"):
        load_factored(out)
    (out / other).unlink()
    with pytest.raises(InvalidInputError, match=f"{other}, named by the index, is missing"):
        load_factored(out)


def test_stock_from_pretrained_refuses_a_missing_factor(saved, tmp_path):
    """Stock transformers would only log a missing key and leave the memory uninitialised: the
    quantizer refuses it."""
    kind, _, factors, out = saved
    folder = _copy(out, tmp_path)
    _rewrite(folder, lambda t: t.pop(f"{_first(factors)}.weight_a"))
    with pytest.raises(ValueError, match="weight_a"):
        _auto(kind).from_pretrained(folder)


def test_a_dense_model_cannot_be_factored_on_the_fly(tmp_path):
    dense = build_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    config = LowRankConfig(ranks={"model.layers.0.self_attn.q_proj": 4})
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config)


# ------------------------------------------------------------------------------------------
# Dense export


def test_export_dense_writes_a_standard_checkpoint(saved, tmp_path):
    kind, model, factors, out = saved
    loaded, _ = load_factored(out)
    ids = _ids(6)
    expected = _outputs(loaded, ids)
    export_dense(loaded)
    assert not factored_modules(loaded)
    assert not hasattr(loaded.config, "quantization_config")
    dense_type = Conv1D if kind == "gpt2" else nn.Linear
    for name in factors:
        assert type(loaded.get_submodule(name)) is dense_type
    torch.testing.assert_close(_outputs(loaded, ids), expected, atol=1e-5, rtol=1e-5)

    loaded.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    keys = {k for f in _safetensors_keys(tmp_path / "dense").values() for k in f["keys"]}
    assert not any(k.endswith((".weight_a", ".weight_b")) for k in keys)
    reloaded, info = _auto(kind).from_pretrained(tmp_path / "dense", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not factored_modules(reloaded) and getattr(reloaded, "hf_quantizer", None) is None
    torch.testing.assert_close(_outputs(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_export_dense_in_memory_model():
    model, _ = _factored_model("gpt2")
    ids = _ids(7)
    expected = _outputs(model, ids)
    export_dense(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
    torch.testing.assert_close(_outputs(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_dense_gpt2_loads_in_a_clean_interpreter(tmp_path):
    """No compressor import at all: a plain transformers process reads the exported GPT-2."""
    model, _ = _factored_model("gpt2")
    export_dense(model)
    model.save_pretrained(tmp_path / "dense")
    ids = _ids(8)
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch, transformers\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "assert not any(k.startswith('compressor') for k in sys.modules)\n"
        "with torch.no_grad():\n"
        "    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "dense"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True, env=env, cwd=tmp_path, timeout=300,
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), _outputs(model, ids), atol=1e-5, rtol=1e-5)


def test_transformers_dequantize_gives_the_dense_model(tmp_path):
    model, _ = _factored_model("llama")
    loaded, _ = load_factored(save_factored(model, None, tmp_path / "out", METADATA))
    ids = _ids(9)
    expected = _outputs(loaded, ids)
    loaded.dequantize()
    assert not factored_modules(loaded) and not hasattr(loaded.config, "quantization_config")
    torch.testing.assert_close(_outputs(loaded, ids), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Atomic writing


class _FailingTokenizer:
    """Writes part of its files, then fails: the save must leave nothing behind."""

    def save_pretrained(self, folder):
        Path(folder, "tokenizer.json").write_text("{}")
        raise RuntimeError("disk trouble")


def test_failed_save_leaves_no_folder(tmp_path):
    model, _ = _factored_model("llama")
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk trouble"):
        save_factored(model, _FailingTokenizer(), dest, METADATA)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no partial sibling either


def test_failed_save_keeps_the_previous_output(tmp_path, monkeypatch):
    model, _ = _factored_model("llama")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "previous.txt").write_text("keep me")

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_factored(model, None, dest, METADATA, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["previous.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_destination(tmp_path):
    model, _ = _factored_model("llama")
    dest = tmp_path / "out"
    dest.mkdir()
    save_factored(model, None, dest, METADATA)  # an empty folder is fine
    with pytest.raises(UsageError, match="not empty"):
        save_factored(model, None, dest, METADATA)
    (dest / "stale.txt").write_text("old")
    save_factored(model, None, dest, METADATA, overwrite=True)
    assert not (dest / "stale.txt").exists() and (dest / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        save_factored(model, None, afile, METADATA, overwrite=True)


def test_atomic_dir_on_interrupt(tmp_path):
    dest = tmp_path / "deep" / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 10)
            raise KeyboardInterrupt
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with atomic_dir(dest) as tmp:
        assert tmp.parent == dest.parent and tmp != dest
        (tmp / "done.txt").write_text("ok")
    assert (dest / "done.txt").read_text() == "ok" and list(dest.parent.iterdir()) == [dest]


def test_legacy_layer_norm_names_are_accepted(saved, tmp_path):
    """transformers renames LayerNorm.gamma/beta on load (and 5.0 writes them back when it saves a
    model it loaded): a folder with those names is valid and loads equal."""
    kind, model, _, out = saved
    folder = _copy(out, tmp_path)
    renamed = []

    def legacy(tensors):
        for key in [k for k in tensors if k.endswith(("LayerNorm.weight", "LayerNorm.bias"))]:
            new = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            tensors[new] = tensors.pop(key)
            renamed.append(new)

    _rewrite(folder, legacy)
    assert renamed or kind != "bert"
    loaded, _ = load_factored(folder)
    ids = _ids(6)
    torch.testing.assert_close(_outputs(loaded, ids), _outputs(model, ids), atol=1e-6, rtol=0)


def test_a_moe_model_whose_experts_transformers_converts_round_trips(tmp_path):
    """Where transformers converts an architecture's tensors while loading (Mixtral's experts are
    stored one by one and fused on load), the factored modules are still checked by name and the
    rest is left to the load's own report."""
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    factors = {name: fs for name, fs in _svd_factors(model).items() if name.endswith(("q_proj", "o_proj"))}
    apply_factors(model, factors)
    out = save_factored(model, None, tmp_path / "moe", METADATA)
    loaded, _ = load_factored(out)
    ids = _ids(7)
    torch.testing.assert_close(_outputs(loaded, ids), _outputs(model, ids), atol=1e-5, rtol=0)
    name = next(iter(factors))
    _rewrite(out, lambda t: t.pop(f"{name}.weight_b"))
    with pytest.raises(InvalidInputError, match=rf"missing {name}\.weight_b"):
        load_factored(out)


def test_a_model_whose_tensor_names_transformers_renames_round_trips(tmp_path):
    """A Llava checkpoint names the language model `language_model.model.…` where the model in
    memory has `model.language_model.…` (save_pretrained reverts transformers' renamings): the
    factors are found under either name, and a missing one is still refused."""
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(text_config=text, vision_config=vision)).eval()
    factors = {}
    for name in ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.mlp.down_proj"):
        u, s, vh = torch.linalg.svd(model.get_submodule(name).weight.detach().double(), full_matrices=False)
        factors[name] = ((u[:, :RANK] * s[:RANK]).float(), vh[:RANK].float())
    apply_factors(model, factors)
    out = save_factored(model, None, tmp_path / "llava", METADATA)
    loaded, _ = load_factored(out)
    ids = _ids(8)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    stored = [k for k in load_file(str(out / "model.safetensors")) if k.endswith("q_proj.weight_a")]
    _rewrite(out, lambda t: t.pop(stored[0]))
    with pytest.raises(InvalidInputError, match=r"missing model\.language_model\.layers\.0\.self_attn\.q_proj\.weight_a"):
        load_factored(out)


def test_the_files_checked_are_the_files_that_load(tmp_path):
    """A single model.safetensors beside an index is what transformers loads: it is what verify reads."""
    model, factors = _factored_model("gpt2")
    out = save_factored(model, None, tmp_path / "g", METADATA, max_shard_size="50KB")
    tensors = {}
    for shard in out.glob("model-*.safetensors"):
        tensors.update(load_file(str(shard)))
    tensors[f"{_first(factors)}.weight_a"][0, 0] = float("nan")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert compressor.formats.validate_factored_folder(out).files == [out / "model.safetensors"]
    from compressor.errors import NumericalError

    with pytest.raises(NumericalError):
        compressor.api.verify(out)


def test_tensors_the_architecture_ignores_on_load_are_not_refused(tmp_path, monkeypatch):
    """Old GPT-2 checkpoints carry each block's causal mask (`attn.bias`), which newer transformers
    releases declare as ignored on load (set here for every release): such a folder is valid (an
    extra tensor of another name is not, above)."""
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "_keys_to_ignore_on_load_unexpected", [r"attn\.bias"])
    model, _ = _factored_model("gpt2")
    folder = save_factored(model, None, tmp_path / "g", METADATA)
    _rewrite(folder, lambda t: t.update({"transformer.h.0.attn.bias": torch.ones(1, 1, 8, 8)}))
    loaded, _ = load_factored(folder)
    ids = _ids(9)
    torch.testing.assert_close(_outputs(loaded, ids), _outputs(model, ids), atol=1e-6, rtol=0)
