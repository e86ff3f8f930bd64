"""Every corrupt or unsafe model input ends in one ``error:`` line and exit 3 (4 for NaN/Inf), never
the internal-error exit 70, and commands with ``-o`` leave no output folder behind.

The inputs are the tiny model fixtures copied to tmp_path and damaged; ``analyze --calib none``
is the cheap command that loads a model. The second half tests the safetensors header validator
and the index's file-name checks directly, one refusal each.
"""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor import cli, loading
from compressor.errors import InvalidInputError
from compressor.formats.safetensors_header import (
    MAX_HEADER_BYTES,
    check_file_name,
    read_safetensors_header,
    read_weight_map,
)
from conftest import run_cli as _run


def _refused(capsys, folder, *words: str, code: int = 3, command=("analyze",), extra=("--calib", "none")) -> str:
    """Run ``compress COMMAND folder …``; assert the exit code and one ``error:`` line holding ``words``."""
    got, _, err = _run(capsys, *command, folder, *extra)
    assert got == code, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _copy(src: Path, tmp_path: Path, name: str = "model") -> Path:
    dest = tmp_path / name
    shutil.copytree(src, dest)
    return dest


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_raw(path: Path, header: str | bytes, data: bytes = b"") -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _write(path: Path, header: dict, data: bytes = b"") -> Path:
    return _write_raw(path, json.dumps(header), data)


def _rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


# ---------------------------------------------------------------- corrupt safetensors files


def test_truncated_file(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused(capsys, folder, "model.safetensors", "past the end of the file", "truncated")


def test_header_length_beyond_the_file(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
    _refused(capsys, folder, "model.safetensors", f"header length {len(data) * 4} exceeds")


def test_duplicate_tensor_names(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    weights = folder / "model.safetensors"
    header, data = _header(weights)
    text = json.dumps(header)
    entry = json.dumps(header[Q_PROJ])
    text = text[:-1] + f', "{Q_PROJ}": {entry}}}'  # the same name again, at the end
    _write_raw(weights, text, data)
    _refused(capsys, folder, f"names '{Q_PROJ}' twice")


def test_data_offsets_out_of_range(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    weights = folder / "model.safetensors"
    header, data = _header(weights)
    begin, end = header[Q_PROJ]["data_offsets"]
    header[Q_PROJ]["data_offsets"] = [begin + len(data), end + len(data)]
    _write(weights, header, data)
    _refused(capsys, folder, Q_PROJ, "past the end of the file")


# ---------------------------------------------------------------- sharded folders: the index


def test_path_traversal_in_the_index(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.sharded_path, tmp_path)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"][Q_PROJ]
    shutil.copy(folder / shard, tmp_path / "outside.safetensors")  # a real file: only the name is wrong
    data["weight_map"][Q_PROJ] = "../outside.safetensors"
    index.write_text(json.dumps(data))
    _refused(capsys, folder, "'../outside.safetensors'", "may not hold a path")


def test_symlink_out_of_the_folder_in_the_index(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.sharded_path, tmp_path)
    data = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = data["weight_map"][Q_PROJ]
    (folder / shard).rename(tmp_path / "elsewhere.safetensors")
    (folder / shard).symlink_to(tmp_path / "elsewhere.safetensors")
    _refused(capsys, folder, shard, "symlink", "outside")


def test_index_lists_a_tensor_no_shard_has(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.sharded_path, tmp_path)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"][Q_PROJ]
    data["weight_map"]["model.layers.0.self_attn.ghost.weight"] = shard
    index.write_text(json.dumps(data))
    _refused(capsys, folder, f"the index puts model.layers.0.self_attn.ghost.weight in {shard}, which does not hold it")


def test_shard_holds_a_tensor_the_index_does_not_list(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.sharded_path, tmp_path)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][Q_PROJ]
    index.write_text(json.dumps(data))
    _refused(capsys, folder, f"the index does not list {Q_PROJ}")


def test_index_names_a_missing_shard(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.sharded_path, tmp_path)
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][Q_PROJ]
    (folder / shard).unlink()
    _refused(capsys, folder, shard, "missing")


def test_index_that_is_not_json(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.sharded_path, tmp_path)
    (folder / "model.safetensors.index.json").write_text("{not json")
    _refused(capsys, folder, "model.safetensors.index.json")


# ---------------------------------------------------------------- tensors the model does not match


def test_missing_tensor(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    _rewrite_tensors(folder, lambda t: t.pop(Q_PROJ))
    _refused(capsys, folder, "missing keys", Q_PROJ)


def test_extra_tensor(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({"model.layers.0.stray.weight": torch.zeros(3)}))
    _refused(capsys, folder, "unexpected keys", "model.layers.0.stray.weight")


def test_mis_shaped_tensor(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({Q_PROJ: torch.zeros(64, 63)}))
    _refused(capsys, folder, Q_PROJ)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_strict_loading_still_loads_the_fixtures(kind, request):
    """GPT-2 ties its head to the embedding and declares optional keys; BERT has a pooler and
    a position_ids buffer: none of it may be refused."""
    tiny = request.getfixturevalue(f"tiny_{kind}")
    loaded = loading.load_model(str(tiny.path))
    for name, p in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name


def test_strict_loading_loads_a_tied_llama(tmp_path, tokenizer):
    """With tie_word_embeddings the checkpoint holds no lm_head.weight: that is not a missing key."""
    import transformers

    from conftest import _llama_config

    config = _llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    loaded = loading.load_model(str(tmp_path / "tied"))
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.lm_head.weight, model.model.embed_tokens.weight)


def test_strict_loading_loads_the_sharded_fixture(tiny_gpt2):
    loaded = loading.load_model(str(tiny_gpt2.sharded_path))
    assert torch.equal(loaded.model.transformer.wte.weight, tiny_gpt2.model.transformer.wte.weight)


# ---------------------------------------------------------------- pickle weights


def _pickle_folder(tiny, tmp_path: Path, state: dict | None = None) -> Path:
    folder = _copy(tiny.path, tmp_path, "pickled")
    (folder / "model.safetensors").unlink()
    torch.save(tiny.model.state_dict() if state is None else state, folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused(capsys, tmp_path, tiny_llama):
    folder = _pickle_folder(tiny_llama, tmp_path)
    _refused(capsys, folder, "pytorch_model.bin", "--allow-pickle")


def test_pickle_weights_load_when_allowed(capsys, tmp_path, tiny_llama):
    folder = _pickle_folder(tiny_llama, tmp_path)
    code, _, err = _run(capsys, "--allow-pickle", "analyze", folder, "--calib", "none")
    assert code == 0, err
    loaded = loading.load_model(str(folder), allow_pickle=True)
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight, tiny_llama.model.model.layers[0].self_attn.q_proj.weight)
    with loading.allowing_pickle():
        assert loading.load_model(str(folder)).source == str(folder.resolve())
    with pytest.raises(InvalidInputError, match="--allow-pickle"):
        loading.load_model(str(folder))  # the context is left: refused again


def test_allowed_pickle_that_matches_nothing_is_refused(capsys, tmp_path, tiny_llama):
    folder = _pickle_folder(tiny_llama, tmp_path, state={"foo": torch.zeros(3)})
    _refused(capsys, folder, "missing keys", command=("--allow-pickle", "analyze"))


def test_pickle_beside_safetensors_is_ignored(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
    code, _, err = _run(capsys, "analyze", folder, "--calib", "none")
    assert code == 0, err


# ---------------------------------------------------------------- non-finite weights: 4


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_exit_4(capsys, tmp_path, tiny_llama, value):
    folder = _copy(tiny_llama.path, tmp_path)

    def poison(t):
        t[Q_PROJ][3, 5] = value

    _rewrite_tensors(folder, poison)
    _refused(capsys, folder, "NaN or Inf", Q_PROJ, code=4)


# ---------------------------------------------------------------- folders and configs


def test_folder_without_config(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    (folder / "config.json").unlink()
    _refused(capsys, folder, "has no config.json")


def test_missing_path(capsys, tmp_path):
    _refused(capsys, tmp_path / "no-such-model", "model not found")


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", ("cannot read", "config.json")),
        ("[1, 2]", ("config.json is a JSON list, not an object",)),
        ('{"model_type": "no-such-architecture"}', ("model_type 'no-such-architecture'",)),
    ],
    ids=["not-json", "not-an-object", "unknown-model-type"],
)
def test_bad_config_json(capsys, tmp_path, tiny_llama, content, words):
    folder = _copy(tiny_llama.path, tmp_path)
    (folder / "config.json").write_text(content)
    _refused(capsys, folder, *words)


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("gptq") / "out"
    assert cli.run(["quantize", str(tiny_llama.path), "--bits", "4", "--group-size", "32", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def factored_folder(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("factored") / "out"
    argv = ["factorize", str(tiny_llama.path), "--target", "0.5", "--method", "svd", "--alloc", "uniform", "-o", str(out)]
    assert cli.run(argv) == 0
    return out


def _edit_qconfig(folder: Path, key: str, value) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"][key] = value
    path.write_text(json.dumps(config))


def test_gptq_with_unsupported_bits(capsys, tmp_path, gptq_folder):
    folder = _copy(gptq_folder, tmp_path)
    _edit_qconfig(folder, "bits", 5)
    _refused(capsys, folder, "bits must be one of")


def test_factored_of_unknown_format_version(capsys, tmp_path, factored_folder):
    folder = _copy(factored_folder, tmp_path)
    _edit_qconfig(folder, "format_version", 99)
    _refused(capsys, folder, "format_version 99")


def test_truncated_factored_checkpoint(capsys, tmp_path, factored_folder):
    folder = _copy(factored_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _refused(capsys, folder, "model.safetensors", "past the end of the file")


def test_truncated_gptq_checkpoint(capsys, tmp_path, gptq_folder):
    folder = _copy(gptq_folder, tmp_path)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    _refused(capsys, folder, weights.name, "past the end of the file")


def test_factorize_leaves_no_output(capsys, tmp_path, tiny_llama):
    folder = _copy(tiny_llama.path, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    _refused(
        capsys, folder, "past the end of the file",
        command=("factorize",), extra=("--target", "0.5", "--method", "svd", "--alloc", "uniform", "-o", out),
    )
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder either


# ---------------------------------------------------------------- the Hub


def test_unreachable_hub_fails_fast(capsys, monkeypatch):
    import huggingface_hub.constants as hub_constants

    calls = []
    real = loading._from_pretrained

    def spy(where, dtype, causal=None, use_safetensors=None, **kwargs):
        calls.append(kwargs)
        return real(where, dtype, causal, use_safetensors, **kwargs)

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "hub_unreachable", lambda timeout=3.0: "https://huggingface.co: simulated")
    monkeypatch.setattr(loading, "_from_pretrained", spy)
    start = time.monotonic()
    line = _refused(capsys, "nonexistent-org-zz/nonexistent-model-zz", "cannot be reached", "simulated", "local Hugging Face cache")
    assert time.monotonic() - start < 30 and calls == [{"local_files_only": True}], line


def test_hub_probe(monkeypatch):
    import huggingface_hub.constants as hub_constants

    class Answer(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert loading.hub_unreachable(timeout=3) is None  # any HTTP answer counts
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")  # closed now
    start = time.monotonic()
    reason = loading.hub_unreachable(timeout=3)
    assert reason is not None and "127.0.0.1" in reason and time.monotonic() - start < 5


def test_hub_warnings_are_printed_once():
    """huggingface_hub logs through a handler of its own and the root logger's: the CLI drops its own."""
    import logging

    import huggingface_hub  # noqa: F401 - installs its handler

    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(logging.StreamHandler())
    with cli._running():
        assert hub_logger.handlers == []


# ---------------------------------------------------------------- the header validator, one refusal each


def _valid_header() -> tuple[dict, bytes]:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
        "empty": {"dtype": "I64", "shape": [0, 5], "data_offsets": [32, 32]},
        "packed": {"dtype": "F4", "shape": [6], "data_offsets": [32, 35]},
    }
    return header, bytes(35)


def test_valid_header_is_read(tmp_path):
    header, data = _valid_header()
    read = read_safetensors_header(_write(tmp_path / "ok.safetensors", header, data))
    assert read.metadata == {"format": "pt"}
    assert read.tensors["a"].shape == (2, 3) and read.tensors["b"].dtype == "BF16"
    assert (read.tensors["packed"].begin, read.tensors["packed"].end) == (32, 35)
    assert read.data_start == 8 + len(json.dumps(header))


def test_header_of_a_real_file_agrees_with_safetensors(tiny_llama):
    from safetensors import safe_open

    read = read_safetensors_header(tiny_llama.path / "model.safetensors")
    with safe_open(str(tiny_llama.path / "model.safetensors"), framework="pt") as f:
        assert set(read.tensors) == set(f.keys())
        for key in f.keys():
            assert list(read.tensors[key].shape) == f.get_slice(key).get_shape()


def _edit(edit):
    """A builder of a valid header and data with ``edit`` applied (in place; or it returns a new pair)."""

    def build():
        header, data = _valid_header()
        edited = edit(header, data)
        return edited if isinstance(edited, tuple) and len(edited) == 2 and isinstance(edited[0], dict) else (header, data)

    return build


def _move_after_a(h: dict, d: bytes, start: int) -> tuple[dict, bytes]:
    """b, empty and packed moved to begin at ``start`` (a holds [0, 24]), the data resized to match."""
    h["b"]["data_offsets"] = [start, start + 8]
    h["empty"]["data_offsets"] = [start + 8, start + 8]
    h["packed"]["data_offsets"] = [start + 8, start + 11]
    return h, bytes(start + 11)


HEADER_PROBLEMS = {
    "unknown dtype": (_edit(lambda h, d: h["a"].update(dtype="F12")), "unknown dtype 'F12'"),
    "negative dimension": (_edit(lambda h, d: h["a"].update(shape=[-2, 3])), "shape [-2, 3] is not a list of non-negative integers"),
    "float dimension": (_edit(lambda h, d: h["a"].update(shape=[2.0, 3])), "is not a list of non-negative integers"),
    "boolean dimension": (_edit(lambda h, d: h["a"].update(shape=[True, 3])), "is not a list of non-negative integers"),
    "offsets not a pair": (_edit(lambda h, d: h["a"].update(data_offsets=[0])), "data_offsets [0] is not [begin, end]"),
    "negative offset": (_edit(lambda h, d: h["a"].update(data_offsets=[-1, 24])), "is not [begin, end] of non-negative"),
    "begin after end": (_edit(lambda h, d: h["a"].update(data_offsets=[24, 0])), "data_offsets [24, 0] begin after they end"),
    "end past the data": (_edit(lambda h, d: h["b"].update(shape=[8], data_offsets=[24, 40])), "the data of b lies past the end of the file"),
    "wrong byte length": (_edit(lambda h, d: h["a"].update(shape=[2, 2])), "24 bytes of data do not hold shape [2, 2] of F32"),
    "half a byte": (_edit(lambda h, d: h["packed"].update(shape=[5])), "do not hold shape [5] of F4"),
    "overlap": (_edit(lambda h, d: _move_after_a(h, d, 20)), "b overlaps a"),
    "gap": (_edit(lambda h, d: _move_after_a(h, d, 26)), "2 bytes before b belong to no tensor"),
    "data not covered": (_edit(lambda h, d: (h, d + bytes(4))), "the tensors cover 35 of the 39 bytes of data"),
    "metadata not str to str": (_edit(lambda h, d: h.update(__metadata__={"format": 1})), "__metadata__ must map strings to strings"),
    "entry not an object": (_edit(lambda h, d: h.update(c=[1, 2])), "c: its entry is a JSON list"),
}


@pytest.mark.parametrize("problem", list(HEADER_PROBLEMS))
def test_header_problem_is_refused(tmp_path, problem):
    build, message = HEADER_PROBLEMS[problem]
    header, data = build()
    path = _write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InvalidInputError, match="bad.safetensors") as refused:
        read_safetensors_header(path)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x02\x03", "shorter than its 8-byte header length"),
        (struct.pack("<Q", 1000) + b"{}", "the header length 1000 exceeds the file's 2 bytes"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "does not start with '{'"),
        (struct.pack("<Q", 4) + b"{\xff\xfe}", "not UTF-8"),
        (struct.pack("<Q", 5) + b"{a: 1", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "does not start with '{'"),
        (struct.pack("<Q", 36) + b'{"x": {"dtype": "F32"}, "x": {}}    ', "names 'x' twice"),
    ],
    ids=["short", "length-beyond-file", "bad-start", "not-utf8", "not-json", "not-an-object", "duplicate"],
)
def test_malformed_header_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match="bad.safetensors") as refused:
        read_safetensors_header(path)
    assert message in str(refused.value)


def test_header_above_the_size_cap_is_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        f.truncate(MAX_HEADER_BYTES + 100)  # sparse: no disk used
    with pytest.raises(InvalidInputError, match=f"exceeds the {MAX_HEADER_BYTES}-byte limit"):
        read_safetensors_header(path)


# ---------------------------------------------------------------- index file names


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", "sub\\x.safetensors", ""])
def test_index_file_names_that_hold_a_path(tmp_path, name):
    with pytest.raises(InvalidInputError, match="may not hold a path"):
        check_file_name(tmp_path, name, "index")


def test_symlinks_inside_the_folder_and_hub_cache_blobs_are_allowed(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "real.safetensors").write_bytes(b"")
    (folder / "link.safetensors").symlink_to(folder / "real.safetensors")
    check_file_name(folder, "link.safetensors", "index")
    snapshot = tmp_path / "models--a--b" / "snapshots" / "abc123"
    blobs = tmp_path / "models--a--b" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "deadbeef").write_bytes(b"")
    (snapshot / "model-1.safetensors").symlink_to(blobs / "deadbeef")
    check_file_name(snapshot, "model-1.safetensors", "index")
    (folder / "out.safetensors").symlink_to(blobs / "deadbeef")  # not a snapshot folder: refused
    with pytest.raises(InvalidInputError, match="outside"):
        check_file_name(folder, "out.safetensors", "index")


@pytest.mark.parametrize(
    "index, message",
    [
        ({"weight_map": {"a": 1}}, "weight_map must map tensor names to file names"),
        ({"metadata": {}}, "weight_map must map tensor names to file names"),
        ([], "weight_map must map tensor names to file names"),
        ({"weight_map": {"a": "nowhere.safetensors"}}, "nowhere.safetensors, named by the index, is missing"),
    ],
)
def test_bad_index(tmp_path, index, message):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidInputError, match=message):
        read_weight_map(tmp_path)


# ---------------------------------------------------------------- bad flags, calibration and adapters


@pytest.mark.parametrize(
    "argv, flag",
    [
        (("factorize", "{missing}", "--target", "1.5", "-o", "{out}"), "target"),
        (("factorize", "{missing}", "--target", "0", "-o", "{out}"), "target"),
        (("compensate", "{missing}", "{missing}", "--rank", "0", "-o", "{out}"), "rank"),
        (("quantize", "{missing}", "--bits", "5", "-o", "{out}"), "bits"),
        (("quantize", "{missing}", "--bits", "4", "--group-size", "0", "-o", "{out}"), "group"),
    ],
)
def test_bad_values_are_refused_before_any_model_loads(capsys, tmp_path, argv, flag):
    """A model path that does not exist would be exit 3: exit 2 shows the flag was checked first."""
    filled = [a.format(missing=tmp_path / "no-such-model", out=tmp_path / "out") for a in argv]
    code, _, err = _run(capsys, *filled)
    assert code == 2, err
    assert flag in err.lower() and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["", "   \n\n  ", "too short"])
def test_empty_or_too_short_calibration_text(capsys, tmp_path, tiny_llama, text):
    calib = tmp_path / "calib.txt"
    calib.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    line = _refused(
        capsys, tiny_llama.path, command=("factorize",),
        extra=("--target", "0.5", "--calib", calib, "--seq-len", "16", "-o", out),
    )
    assert "calib" in line.lower() or str(calib) in line
    assert not out.exists()


def test_rank_deficient_calibration_gram_is_handled(capsys, tmp_path, tiny_llama, text_file):
    """One window of 4 tokens: every input Gram has rank ≤ 4 of 64 or more columns. The run
    completes, writes a checkpoint that loads, and its weights are finite."""
    out = tmp_path / "out"
    code, _, err = _run(
        capsys, "factorize", tiny_llama.path, "--target", "0.5", "--calib", text_file,
        "--calib-samples", "1", "--seq-len", "4", "--fisher-windows", "1", "-o", out,
    )
    assert code == 0, err
    model = loading.load_model(str(out)).model  # load_model refuses NaN/Inf weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adapter_that_does_not_fit_the_base(capsys, tmp_path, tiny_llama, tiny_qwen2, text_file):
    """An adapter made for another model: its modules' shapes do not match (exit 3)."""
    from compressor.formats.adapter import LowRankTerm, save_adapter

    adapter = tmp_path / "adapter"
    name = "model.layers.0.self_attn.q_proj"
    save_adapter(adapter, {name: LowRankTerm(torch.zeros(7, 2), torch.zeros(2, 5))}, base_model="other")
    code, _, err = _run(capsys, "eval", tiny_llama.path, "--data", text_file, "--seq-len", "16", "--adapter", adapter)
    assert code == 3, err
    assert name in err
