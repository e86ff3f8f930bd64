"""The releasing safetensors writer: the same file as safetensors' own, pages released behind it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compressor.formats.writer import releasing_writer, save_file
from compressor.residency import Spill, resident_bytes


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.b.weight": torch.randn(33, 17, generator=g),
        "model.a.weight": torch.randn(9, generator=g).to(torch.bfloat16),
        "ids": torch.arange(5),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "strided": torch.randn(8, 6, generator=g)[:, ::2],
    }


@pytest.mark.parametrize("chunk", [None, 24, 7])  # whole tensors; slices of 24 bytes; of less than an element
def test_reads_back_equal_with_metadata(tmp_path, monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr("compressor.formats.writer.WRITE_CHUNK_BYTES", chunk)
    tensors = _tensors()
    save_file(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    got = load_file(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_safetensors_reads_names_and_dtypes_of_one_width_mixed(tmp_path):
    tensors = {"ü.weight": torch.arange(6, dtype=torch.int32), "f": torch.randn(3), "h": torch.randn(2).half(),
               "b": torch.randn(2).bfloat16(), "u": torch.arange(3, dtype=torch.uint8), "i": torch.arange(3, dtype=torch.int8)}
    save_file(tensors, tmp_path / "x.safetensors", {})
    got = load_file(tmp_path / "x.safetensors")
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors)


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(ValueError, match="strings"):
        save_file({"a": torch.zeros(1)}, tmp_path / "x.safetensors", {"format": 1})


def test_mapped_tensors_are_released_after_writing(tmp_path):
    if resident_bytes([torch.zeros(1)]) is None:
        pytest.skip("needs a readable /proc/self/pagemap")
    (tmp_path / "spill").mkdir()
    spill = Spill(tmp_path / "spill")
    mapped = {f"t{i}": spill.hold(torch.randn(64, 256)) for i in range(3)}
    for t in mapped.values():
        t.sum()
    assert all(resident_bytes([t]) > 0 for t in mapped.values())
    save_file(mapped, tmp_path / "x.safetensors")
    assert all(resident_bytes([t]) == 0 for t in mapped.values())
    got = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(got[k], v) for k, v in mapped.items())


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        save_file({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")


def test_transformers_writes_through_it_only_inside_the_context(tiny_llama, tmp_path, monkeypatch):
    from transformers import modeling_utils

    from compressor.loading import load_model

    calls = []
    import compressor.formats.writer as writer

    monkeypatch.setattr(writer, "save_file", lambda tensors, filename, metadata=None: (calls.append(filename), save_file(tensors, filename, metadata))[1])
    original = modeling_utils.safe_save_file
    model = load_model(str(tiny_llama.path)).model
    with releasing_writer():
        model.save_pretrained(tmp_path / "out")
    assert modeling_utils.safe_save_file is original and len(calls) == 1
    reloaded = load_file(tmp_path / "out" / "model.safetensors")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(reloaded[name], p, rtol=0, atol=0)


def test_transformers_writer_restored_after_an_error(tiny_llama, tmp_path):
    from transformers import modeling_utils

    original = modeling_utils.safe_save_file
    with pytest.raises(RuntimeError, match="boom"):
        with releasing_writer():
            assert modeling_utils.safe_save_file is save_file
            raise RuntimeError("boom")
    assert modeling_utils.safe_save_file is original
