"""RTN quantization written as GPTQ checkpoints: the rounding error, save → load exactness on tiny
LLaMA / Qwen2 / GPT-2, folders as GPTQModel and auto-gptq write them, corrupt folders refused,
and ``compress quantize`` through the API and the CLI."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compressor
from compressor import api
from compressor.errors import InvalidInputError, NumericalError, UsageError
from compressor.formats.gptq import GptqConfig, load_gptq, save_gptq, validate_gptq_folder
from compressor.formats.gptq_packing import BITS, pack_qzeros, unpack_qzeros
from compressor.options import CalibrationOptions, QuantizeOptions
from compressor.quantize import quantize_rtn, rtn_quantize
from compressor.targets import select_targets
from conftest import _llama_config, build_model
from conftest import run_cli as _run


# ---------------------------------------------------------------- the rounding


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [16, 40, -1])
def test_rtn_error_is_at_most_half_a_step(bits, sym, group_size):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 96, generator=gen) * 0.05
    w[0, :48] = w[0, :48].abs() + 0.01  # groups with no negative weight: asym's zero point floors at 1
    w[1, :48] = -w[1, :48].abs() - 0.01  # and with no positive one
    w[2] = 0.0
    q = rtn_quantize(w, bits, group_size, sym)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.dtype == torch.float16 and bool((q.scales > 0).all())
    if sym:
        assert bool((q.zeros == 2 ** (bits - 1)).all())
    else:
        assert 1 <= int(q.zeros.min()) and int(q.zeros.max()) <= 2**bits - 1  # v1 stores zero − 1
    step = q.scales.float()[q.g_idx.long()].t()
    error = (q.dequantize() - w).abs()
    assert bool((error <= step * (0.5 + 1e-5)).all()), float((error / step).max())
    assert torch.equal(q.dequantize()[2], torch.zeros(96))


def test_rtn_refuses_nan():
    w = torch.zeros(32, 32)
    w[3, 3] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        rtn_quantize(w, 4, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "--bits"),
        ({"bits": 4, "group_size": 0}, "--group-size"),
        ({"bits": 4, "group_size": -2}, "--group-size"),
        ({"bits": 4, "method": "awq"}, "--method"),
        ({"bits": 4, "calib_dtype": "float8"}, "--calib-dtype"),
    ],
)
def test_options_refuse_bad_values(kwargs, message):
    with pytest.raises(UsageError, match=message):
        QuantizeOptions(**kwargs)
    assert QuantizeOptions(bits=4, method="gptq").needs_calibration
    assert not QuantizeOptions(bits=4).needs_calibration


# ---------------------------------------------------------------- save → load


def _quantized(kind: str, folder: Path, bits: int = 4, group_size: int = 48, sym: bool = True, model=None, **save):
    model = build_model(kind) if model is None else model
    outcome = quantize_rtn(select_targets(model), QuantizeOptions(bits=bits, group_size=group_size, sym=sym))
    config = GptqConfig(bits=bits, group_size=group_size, sym=sym, meta={"quantizer": ["compress:test"]})
    save_gptq(model, None, folder, outcome.quantized, config, **save)
    return model, outcome


def _same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("kind, bits, group_size, sym", [("llama", 4, 48, True), ("llama", 3, -1, False), ("qwen2", 2, 32, False), ("gpt2", 8, 40, True)])
def test_save_load_gives_the_dequantized_model(tmp_path, kind, bits, group_size, sym):
    folder = tmp_path / "q"
    model, outcome = _quantized(kind, folder, bits, group_size, sym)
    for target in select_targets(model):  # the model holds exactly the dequantized weights
        dense = outcome.quantized[target.name].dequantize()
        assert torch.equal(target.weight(), dense), target.name
    loaded, tokenizer = load_gptq(folder)
    assert tokenizer is None and not hasattr(loaded.config, "quantization_config")
    _same_model(model, loaded)
    tensors = load_file(folder / "model.safetensors")
    for name in outcome.quantized:
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.qweight"].dtype == torch.int32 and tensors[f"{name}.scales"].dtype == torch.float16
    if kind == "qwen2":  # q/k/v keep their bias, and the original values
        original = build_model("qwen2").model.layers[0].self_attn.q_proj.bias
        assert torch.equal(tensors["model.layers.0.self_attn.q_proj.bias"], original)
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    expected = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": sym, "checkpoint_format": "gptq"}
    assert {k: qconfig[k] for k in expected} == expected and qconfig["meta"]["quantizer"] == ["compress:test"]
    assert json.loads((folder / "quantize_config.json").read_text()) == qconfig


def test_tied_embeddings_rotary_and_shards(tmp_path):
    import transformers

    config = _llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path / "q"
    _quantized("llama", folder, model=model, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    loaded, _ = compressor.load(folder)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    _same_model(model, loaded)


def test_load_model_routes_gptq_folders(tmp_path, tokenizer):
    folder = tmp_path / "q"
    model, _ = _quantized("llama", folder)
    tokenizer.save_pretrained(folder)
    loaded = compressor.load_model(str(folder), torch.bfloat16)
    assert loaded.folder == folder and loaded.tokenizer is not None
    dense = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(loaded.model.model.layers[1].mlp.down_proj.weight, dense.to(torch.bfloat16))


def _rewrite(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_auto_gptq_folder(tmp_path):
    """No quantization_config in config.json, quantize_config.json without quant_method, one
    safetensors file of another name: auto-gptq's layout."""
    folder = tmp_path / "q"
    model, _ = _quantized("llama", folder)
    qconfig = json.loads((folder / "quantize_config.json").read_text())
    del qconfig["quant_method"], qconfig["checkpoint_format"]
    (folder / "quantize_config.json").write_text(json.dumps(qconfig))
    _edit_config(folder, lambda c: c.pop("quantization_config"))
    (folder / "model.safetensors").rename(folder / "gptq_model-4bit-48g.safetensors")
    _same_model(model, compressor.load_model(str(folder)).model)


def test_gptqmodel_dynamic_and_v2(tmp_path):
    """GPTQModel's "format": "gptq_v2" (zero points as they are), a layer its ``dynamic`` leaves
    dense ("-:" pattern) and one it quantizes at other bits."""
    folder = tmp_path / "q"
    model, outcome = _quantized("llama", folder)
    dense = "model.layers.0.mlp.down_proj"
    eight = "model.layers.1.mlp.up_proj"
    up = model.get_submodule(eight)
    q8 = rtn_quantize(up.weight, 8, 48)
    with torch.no_grad():
        up.weight.copy_(q8.dequantize())

    def edit(tensors):
        for key in [k for k in tensors if k.endswith(".qzeros")]:
            tensors[key] = pack_qzeros(unpack_qzeros(tensors[key], 4), 4, checkpoint_format="gptq_v2")
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            del tensors[f"{dense}.{suffix}"]
        tensors[f"{dense}.weight"] = model.get_submodule(dense).weight.detach().clone()
        tensors.update({f"{eight}.{k}": v for k, v in q8.packed("gptq_v2").items()})

    _rewrite(folder, edit)

    def configure(config):
        q = config["quantization_config"]
        del q["checkpoint_format"]
        q.update(format="gptq_v2", pack_dtype="int32", dynamic={r"-:.*\.0\.mlp\.down_proj": {}, r"+:.*\.1\.mlp\.up_proj": {"bits": 8}})

    _edit_config(folder, configure)
    folder_info = validate_gptq_folder(folder)
    assert dense not in folder_info.modules and folder_info.modules[eight].bits == 8
    loaded, _ = load_gptq(folder)
    _same_model(model, loaded)


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gptq") / "q"
    _quantized("llama", folder)
    return folder


def _broken(checkpoint: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(checkpoint, folder)
    _rewrite(folder, edit)
    return folder


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(f"{Q}.qzeros"), f"{Q} has qweight but lacks qzeros"),
        (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:1]}), rf"{Q}.scales is \[1, 64\], expected \[2, 64\]"),
        (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()}), f"{Q}.qweight is F32"),
        (lambda t: t.update({"model.layers.0.nonexistent.qweight": t[f"{Q}.qweight"].clone()}), "no linear layer model.layers.0.nonexistent"),
        (lambda t: t.pop("model.norm.weight"), "missing keys: model.norm.weight"),
    ],
)
def test_corrupt_checkpoint_is_refused(checkpoint, tmp_path, edit, message):
    folder = _broken(checkpoint, tmp_path, edit)
    with pytest.raises(InvalidInputError, match=message):
        load_gptq(folder)


def test_g_idx_out_of_range(checkpoint, tmp_path):
    folder = _broken(checkpoint, tmp_path, lambda t: t.update({f"{Q}.g_idx": t[f"{Q}.g_idx"] + 5}))
    with pytest.raises(InvalidInputError, match="g_idx holds groups outside"):
        load_gptq(folder)


@pytest.mark.parametrize("bits", [5, "four"])
def test_bad_config_is_refused(checkpoint, tmp_path, bits):
    folder = tmp_path / "bad"
    shutil.copytree(checkpoint, folder)
    _edit_config(folder, lambda c: c["quantization_config"].update(bits=bits))
    with pytest.raises(InvalidInputError, match="bits"):
        load_gptq(folder)


def test_corrupt_checkpoint_exits_3(capsys, checkpoint, tmp_path, small_text_file):
    folder = _broken(checkpoint, tmp_path, lambda t: t.pop(f"{Q}.scales"))
    code, _, err = _run(capsys, "eval", folder, "--data", small_text_file, "--seq-len", 16)
    assert code == 3, err
    assert "lacks scales" in err and "Traceback" not in err


# ---------------------------------------------------------------- API and CLI


def test_cli_quantize_then_eval(capsys, tmp_path, tiny_qwen2, small_text_file):
    out = tmp_path / "q3"
    report = tmp_path / "q3.json"
    code, stdout, err = _run(
        capsys, "quantize", tiny_qwen2.path, "--bits", 3, "--group-size", 32, "--asym", "-o", out, "--json", report
    )
    assert code == 0, err
    assert "quantized 14 layers to 3 bits" in stdout
    data = json.loads(report.read_text())
    assert (data["method"], data["bits"], data["group_size"], data["sym"], data["quantized_modules"]) == ("rtn", 3, 32, False, 14)
    assert data["file_bytes"] > 0 and data["calibration"] is None
    code, stdout, err = _run(capsys, "eval", out, "--data", small_text_file, "--seq-len", 16)
    assert code == 0, err
    assert "perplexity" in stdout


def _no_load(*args, **kwargs):
    raise AssertionError("the model must not load")


@pytest.mark.parametrize(
    "args",
    [
        ("--bits", 5, "-o", "{out}"),
        ("--bits", 4, "--group-size", 0, "-o", "{out}"),
        ("--bits", 4, "--method", "awq", "-o", "{out}"),
        ("--bits", 4, "-o", "{full}"),
    ],
)
def test_cli_usage_errors_before_loading(capsys, monkeypatch, tmp_path, tiny_llama, args):
    monkeypatch.setattr(compressor.loading, "load_model", _no_load)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    argv = [str(a).format(out=tmp_path / "out", full=full) for a in args]
    code, _, err = _run(capsys, "quantize", tiny_llama.path, *argv)
    assert code == 2, err
    code, _, err = _run(capsys, "quantize", tmp_path / "no-such-model", *argv)
    assert code == 2, err
    assert not (tmp_path / "out").exists()


def test_unpackable_layers_are_refused_before_any_work(tmp_path):
    import transformers

    config = _llama_config()
    config.hidden_size, config.intermediate_size = 48, 96  # 48 is not a multiple of 32
    model = transformers.LlamaForCausalLM(config).eval()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    loaded = compressor.LoadedModel(model, None, "odd", None)
    with pytest.raises(UsageError, match=r"14 layers cannot be packed as GPTQ.*q_proj \(64×48\): in_features 48 not a multiple of 32"):
        api.quantize(loaded, QuantizeOptions(bits=4), output=tmp_path / "out")
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight, before)
    assert not (tmp_path / "out").exists()


def test_gptq_method_without_its_module(monkeypatch, tmp_path, tiny_llama):
    monkeypatch.setitem(sys.modules, "compressor.quantize_gptqmodel", None)
    monkeypatch.setattr(compressor.loading, "load_model", _no_load)
    with pytest.raises(UsageError, match=r"pip install -e '\.\[gptq\]'"):
        api.quantize(str(tiny_llama.path), QuantizeOptions(bits=4, method="gptq"), output=tmp_path / "out")


def test_gptq_method_calls_the_backend(monkeypatch, tmp_path, tiny_llama, text_file):
    """--method gptq: options checked before the load, calibration windows made, the backend
    writes the folder, the result read back from it."""
    calls = []
    backend = types.ModuleType("compressor.quantize_gptqmodel")
    backend.check_options = lambda options: calls.append(("check", options.bits))

    def quantize_with_gptqmodel(loaded, options, calibration, output, *, overwrite=False):
        calls.append(("quantize", tuple(calibration.input_ids.shape), output, overwrite))
        model = build_model("llama")
        outcome = quantize_rtn(select_targets(model), options)
        save_gptq(model, None, output, outcome.quantized, GptqConfig(options.bits, options.group_size))

    backend.quantize_with_gptqmodel = quantize_with_gptqmodel
    monkeypatch.setitem(sys.modules, "compressor.quantize_gptqmodel", backend)
    out = tmp_path / "out"
    result = api.quantize(
        str(tiny_llama.path), QuantizeOptions(bits=4, method="gptq"), CalibrationOptions(str(text_file), 2, 16), output=out
    )
    assert calls == [("check", 4), ("quantize", (2, 16), out, False)]
    assert len(result.modules) == 14 and result.calibration["samples"] == 2 and result.output == out
