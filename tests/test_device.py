"""--device: resolved and checked before anything loads; on a GPU, the same results as on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.device import resolve_device
from compressor.errors import UsageError
from conftest import run_cli

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@no_cuda
def test_auto_is_the_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cpu:0", "auto:1", "", "cuda:-1"])
def test_unknown_devices_are_usage_errors(spec):
    with pytest.raises(UsageError, match="--device"):
        resolve_device(spec)


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device(spec)


@no_cuda
@pytest.mark.parametrize(
    "argv",
    [
        ("eval", "{missing}", "--data", "{text}", "--device", "cuda"),
        ("analyze", "{missing}", "--calib", "none", "--device", "cuda:0"),
        ("factorize", "{missing}", "--target", "0.5", "-o", "{out}", "--device", "cuda"),
        ("check", "{missing}", "{missing}", "--data", "{text}", "--device", "gpu"),
    ],
)
def test_a_device_that_is_not_there_is_refused_before_loading(capsys, tmp_path, text_file, argv):
    """The model path does not exist (exit 3 if it were read): exit 2 shows --device came first."""
    filled = [a.format(missing=tmp_path / "nothing", text=text_file, out=tmp_path / "out") for a in argv]
    code, _, err = run_cli(capsys, *filled)
    assert code == 2, err
    assert "--device" in err
    assert not (tmp_path / "out").exists()


def test_device_cpu_gives_the_default_result(capsys, tiny_llama, small_text_file, tmp_path):
    results = []
    for extra in ((), ("--device", "cpu")):
        path = tmp_path / f"eval{len(extra)}.json"
        code, _, err = run_cli(capsys, "eval", tiny_llama.path, "--data", small_text_file, "--seq-len", 16, "--json", path, *extra)
        assert code == 0, err
        results.append(json.loads(path.read_text())["perplexity"])
    assert results[0] == results[1]


# ---------------------------------------------------------------- on a GPU (pytest -m gpu)


@pytest.mark.gpu
def test_factorize_on_cuda_matches_the_cpu(capsys, tiny_llama, text_file, tmp_path):
    from safetensors.torch import load_file

    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        code, _, err = run_cli(
            capsys, "factorize", tiny_llama.path, "--target", "0.6", "--calib", text_file, "--calib-samples", 4,
            "--seq-len", 32, "--calib-dtype", "float32", "--device", device, "-o", outs[device],
        )
        assert code == 0, err
    configs = {d: json.loads((outs[d] / "config.json").read_text())["quantization_config"]["ranks"] for d in outs}
    assert configs["cpu"] == configs["cuda"]
    cpu, cuda = load_file(str(outs["cpu"] / "model.safetensors")), load_file(str(outs["cuda"] / "model.safetensors"))
    assert cpu.keys() == cuda.keys()
    modules = [name.removesuffix(".weight_a") for name in cpu if name.endswith(".weight_a")]
    assert modules
    for module in modules:  # the products, since the factors of equal singular values may rotate
        w_cpu = cpu[f"{module}.weight_b"].double() @ cpu[f"{module}.weight_a"].double()
        w_cuda = cuda[f"{module}.weight_b"].double() @ cuda[f"{module}.weight_a"].double()
        assert float((w_cuda - w_cpu).norm() / w_cpu.norm()) < 1e-3, module

@pytest.mark.gpu
def test_check_on_cuda_matches_the_cpu(capsys, tiny_llama, text_file, tmp_path):
    reports = {}
    for device in ("cpu", "cuda"):
        reports[device] = tmp_path / f"{device}.json"
        code, _, err = run_cli(
            capsys, "check", tiny_llama.path, tiny_llama.path, "--data", text_file, "--seq-len", 16,
            "--max-windows", 4, "--device", device, "--json", reports[device],
        )
        assert code == 0, err
    cpu, cuda = (json.loads(reports[d].read_text())["metrics"] for d in ("cpu", "cuda"))
    for metric in ("perplexity_original", "perplexity"):
        assert cuda[metric]["value"] == pytest.approx(cpu[metric]["value"], rel=1e-4)
