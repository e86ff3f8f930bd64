"""GPTQ through GPTQModel (the ``gptq`` extra), on the tiny random LLaMA: the folder it writes is
GPTQ v1 without desc_act, our dequantizer reads its tensors as GPTQModel's own kernel does, and
``load_gptq`` loads it. Tests that quantize are skipped where gptqmodel is not installed."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.calibration.sources import load_calibration
from compressor.errors import UsageError
from compressor.loading import LoadedModel, load_model
from compressor.options import CalibrationOptions
from compressor.quantize_gptqmodel import (
    SIDE_INFO_KEY,
    check_options,
    import_gptqmodel,
    partial_groups,
    quantize_with_gptqmodel,
)
from conftest import VOCAB, build_model

GROUP = 32  # divides every in_features of the tiny LLaMA (64, 128)


@dataclass(frozen=True)
class Options:
    bits: int
    group_size: int = GROUP
    sym: bool = True
    calib_dtype: str = "auto"


@dataclass
class Quantized:
    bits: int
    folder: Path
    tensors: dict[str, torch.Tensor]

    def prefixes(self) -> list[str]:
        return sorted(name.removesuffix(".qweight") for name in self.tensors if name.endswith(".qweight"))

    def dequantized(self, prefix: str) -> torch.Tensor:
        """Our reading of one layer's four tensors: its weight [out, in]."""
        from compressor.formats.gptq import dequantize

        t = {part: self.tensors[f"{prefix}.{part}"] for part in ("qweight", "qzeros", "scales", "g_idx")}
        return dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], self.bits)


@pytest.fixture(scope="module")
def gptqmodel():
    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed: pip install -e '.[gptq]'")
    return import_gptqmodel()


@pytest.fixture(scope="module", params=[4, 3], ids=["w4", "w3"])
def quantized(request, gptqmodel, tiny_llama, text_file, tmp_path_factory) -> Quantized:
    loaded = load_model(str(tiny_llama.path))
    calibration = load_calibration(CalibrationOptions(str(text_file), samples=8, seq_len=32), loaded.tokenizer)
    folder = tmp_path_factory.mktemp(f"gptq-w{request.param}") / "out"
    workdir = tmp_path_factory.mktemp(f"cwd-w{request.param}")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)  # GPTQModel would leave a logs/ folder in the working directory
        # GPTQModel's packer compiles a C++ extension on its first use on a machine (~20 s); its
        # Python path writes the same tensors.
        patch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
        quantize_with_gptqmodel(loaded, Options(request.param), calibration, folder)
    assert [p.name for p in folder.parent.iterdir()] == ["out"]  # no scratch folder left beside it
    assert list(workdir.iterdir()) == []  # nor anything in the working directory
    return Quantized(request.param, folder, load_file(folder / "model.safetensors"))


def test_writes_gptq_v1_without_desc_act(quantized):
    config = json.loads((quantized.folder / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "gptq" and qconfig["checkpoint_format"] == "gptq"
    assert (qconfig["bits"], qconfig["group_size"], qconfig["sym"]) == (quantized.bits, GROUP, True)
    assert qconfig["desc_act"] is False
    assert qconfig["meta"][SIDE_INFO_KEY]["calibration"]["samples"] == 8
    assert json.loads((quantized.folder / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    assert (quantized.folder / "tokenizer.json").is_file()
    prefixes = quantized.prefixes()
    assert len(prefixes) == 14  # q, k, v, o, gate, up, down in both blocks; the head stays float
    for prefix in prefixes:
        t = {part: quantized.tensors[f"{prefix}.{part}"] for part in ("qweight", "qzeros", "scales", "g_idx")}
        columns = t["g_idx"].numel()
        assert t["qweight"].dtype == t["qzeros"].dtype == t["g_idx"].dtype == torch.int32
        assert t["scales"].dtype == torch.float16
        assert t["qweight"].shape[0] == columns * quantized.bits // 32
        assert t["scales"].shape[0] == t["qzeros"].shape[0] == columns // GROUP
        assert t["qzeros"].shape[1] == t["scales"].shape[1] * quantized.bits // 32
        # desc_act False: the groups in order, so kernels that ignore g_idx read the layer right
        assert torch.equal(t["g_idx"], torch.arange(columns, dtype=torch.int32) // GROUP)


def test_our_dequantize_matches_gptqmodel(quantized, gptqmodel):
    backend = gptqmodel.BACKEND.TORCH
    qmodel = gptqmodel.GPTQModel.load(str(quantized.folder), backend=backend, device="cpu", dtype=torch.float16)
    modules = dict(qmodel.model.named_modules())
    for prefix in quantized.prefixes():
        ours = quantized.dequantized(prefix)
        module = modules[prefix]
        # The class's method: the instance's is wrapped in torch.compile, slow to build on a CPU.
        theirs = type(module).dequantize_weight(module).T.float()  # [in, out] → [out, in]
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-3, atol=1e-5, msg=lambda m: f"{prefix}: {m}")


@torch.no_grad()
def test_load_gptq_loads_the_folder(quantized, tiny_llama):
    from compressor.formats.gptq import load_gptq

    model, tokenizer = load_gptq(quantized.folder, torch.float32)
    expected = build_model("llama")  # the tiny LLaMA, its quantized layers given the dequantized weights
    for prefix in quantized.prefixes():
        expected.get_submodule(prefix).weight.copy_(quantized.dequantized(prefix).float())
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert tokenizer("the river").input_ids == tiny_llama.tokenizer("the river").input_ids


def test_model_without_a_folder_is_saved_for_gptqmodel_first(gptqmodel, tiny_llama, text_file, tmp_path, monkeypatch):
    from compressor.formats.gptq import validate_gptq_folder

    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
    loaded = LoadedModel(tiny_llama.model, tiny_llama.tokenizer, "hub:tiny", None)  # as a hub model loads
    calibration = load_calibration(CalibrationOptions(str(text_file), samples=4, seq_len=32), loaded.tokenizer)
    quantize_with_gptqmodel(loaded, Options(4, sym=False), calibration, tmp_path / "out")
    assert len(validate_gptq_folder(tmp_path / "out").modules) == 14
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("bits, group_size", [(5, 32), (16, 32), (4, 48), (4, 0)])
def test_unsupported_bits_or_group_size_fail_before_loading(bits, group_size):
    with pytest.raises(UsageError):
        check_options(Options(bits, group_size))


def test_partial_groups_names_the_layers_vllm_refuses():
    model = build_model("llama")  # in_features 64 (q, k, v, o, gate, up) and 128 (down)
    assert partial_groups(model, GROUP) == []
    assert partial_groups(model, -1) == []
    uneven = partial_groups(model, 128)
    assert len(uneven) == 12 and not any("down_proj" in name or name == "lm_head" for name in uneven)


def test_already_quantized_model_is_refused(gptqmodel, tiny_llama, tmp_path):
    folder = tmp_path / "quantized"
    folder.mkdir()
    config = json.loads((tiny_llama.path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = LoadedModel(tiny_llama.model, tiny_llama.tokenizer, str(folder), folder)
    with pytest.raises(UsageError, match="already quantized"):
        quantize_with_gptqmodel(loaded, Options(4), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_gptqmodel_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # found nowhere, its import fails: as if not installed
    with pytest.raises(UsageError, match=r"pip install -e '\.\[gptq\]'"):
        check_options(Options(4))
    with pytest.raises(UsageError, match=r"pip install -e '\.\[gptq\]'"):
        import_gptqmodel()
