"""Random corruptions of real safetensors files, shard indexes, config.json files and GGUF files:
``compress analyze`` either refuses them (exit 3, or 4 for NaN/Inf) with one error line, or loads
exactly the tensors they hold; never exit 70, an escaping exception, a hang or gigabytes of memory.

The fuzzer itself is tests/fuzzing.py (benchmarks/fuzz_readers.py runs it longer). Below the
bounded fuzz run come one regression test per bug it found, and tests that its exit-0 checks do
catch a randomly initialised weight.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

import fuzzing
from compressor import cli

CASES_PER_READER = 60
SEED = 20240601


@pytest.fixture(scope="module")
def fixtures(tiny_llama, tmp_path_factory) -> fuzzing.Fixtures:
    return fuzzing.build_fixtures(tmp_path_factory.mktemp("fuzz-fixtures"), tiny_llama.model, tiny_llama.tokenizer,
                                  single=tiny_llama.path, sharded=tiny_llama.sharded_path)


@pytest.fixture(scope="module")
def layout(fixtures) -> fuzzing.GgufLayout:
    return fuzzing.gguf_layout(fixtures.gguf.read_bytes())


@pytest.mark.parametrize("reader", fuzzing.READERS)
def test_fuzzed_inputs_are_refused_or_loaded_exactly(reader, fixtures, tmp_path):
    outcomes = fuzzing.run_cases([reader], CASES_PER_READER, SEED, fixtures, tmp_path, time_limit=30.0)
    failures = [o for o in outcomes if o.failed]
    assert not failures, "\n".join(f"{o.mutation}: {o.why}\n  {o.reproduce()}" for o in failures)
    verdicts = {o.verdict for o in outcomes}
    assert "refused" in verdicts  # the fuzzer does damage files...
    if reader in ("safetensors", "gguf"):
        assert "loaded" in verdicts  # ...and some damage (to weight data) is legitimately loaded and checked


def test_clean_fixtures_load(fixtures, tmp_path):
    for path in (fixtures.single, fixtures.sharded, fixtures.gguf):
        with fuzzing._fresh_cache(tmp_path / "cache"):
            code, err = fuzzing.run_cli(["analyze", str(path), "--calib", "none"])
        assert code == 0, err
        assert fuzzing.check_loaded("gguf" if path.suffix == ".gguf" else "safetensors", path, fixtures, tmp_path) is None


def test_the_mutations_are_reproducible(fixtures, tmp_path):
    first = fuzzing.run_case(fuzzing.Case("gguf", 3, 7), fixtures, tmp_path / "a")
    second = fuzzing.run_case(fuzzing.Case("gguf", 3, 7), fixtures, tmp_path / "b")
    assert (first.mutation, first.code, first.verdict) == (second.mutation, second.code, second.verdict)


# ---------------------------------------------------------------- the exit-0 checks can fail


def _reinitialised(loaded, name: str):
    with torch.no_grad():
        loaded.model.get_parameter(name).normal_()
    return loaded


def test_folder_check_catches_a_weight_that_was_not_loaded(fixtures, monkeypatch):
    import compressor

    real = compressor.load_model
    monkeypatch.setattr(compressor, "load_model", lambda spec: _reinitialised(real(spec), "model.norm.weight"))
    assert "model.norm.weight differs" in fuzzing.check_loaded("config", fixtures.single, fixtures, fixtures.single)


def test_gguf_check_catches_a_randomly_initialised_weight(fixtures, monkeypatch, tmp_path):
    import compressor

    real = compressor.load_model
    monkeypatch.setattr(compressor, "load_model", lambda spec: _reinitialised(real(spec), "model.layers.0.mlp.up_proj.weight"))
    assert "changes with the random seed" in fuzzing.check_loaded("gguf", fixtures.gguf, fixtures, tmp_path)


def test_gguf_check_catches_a_weight_left_at_a_constant(fixtures, monkeypatch, tmp_path):
    import compressor

    real = compressor.load_model

    def ones(spec):
        loaded = real(spec)
        with torch.no_grad():
            loaded.model.model.norm.weight.fill_(1.0)
        return loaded

    monkeypatch.setattr(compressor, "load_model", ones)
    assert "model.norm.weight is constant" in fuzzing.check_loaded("gguf", fixtures.gguf, fixtures, tmp_path)


def test_a_case_that_hangs_or_crashes_fails(fixtures, monkeypatch, tmp_path):
    def slow(argv):
        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "run", slow)
    outcome = fuzzing.run_case(fuzzing.Case("index", 0, 0), fixtures, tmp_path / "slow", time_limit=0.5)
    assert outcome.failed and outcome.why.startswith("hang")

    monkeypatch.setattr(cli, "run", lambda argv: 70)
    outcome = fuzzing.run_case(fuzzing.Case("index", 0, 0), fixtures, tmp_path / "crash")
    assert outcome.failed and outcome.why.startswith("exit 70")


# ---------------------------------------------------------------- regressions: each bug the fuzzer found


def _refused(path: Path, *words: str, cache: Path | None = None, seconds: float = 10.0) -> str:
    """``compress analyze PATH --calib none``: exit 3, one error line holding ``words``, quickly and
    without a jump in memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with fuzzing._fresh_cache(cache or path.parent / "cache"), fuzzing._time_limit(max(30.0, seconds)):
        code, err = fuzzing.run_cli(["analyze", str(path), "--calib", "none"])
    assert code == 3, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    assert time.perf_counter() - start < seconds, lines[0]
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 < 500 * 2**20, "memory jumped"
    return lines[0]


def _folder(fixtures, tmp_path: Path, sharded: bool = False) -> Path:
    return Path(shutil.copytree(fixtures.sharded if sharded else fixtures.single, tmp_path / "model"))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("num_key_value_heads", 0, ["cannot load the model"]),  # was ZeroDivisionError: exit 70
        # huggingface_hub's validation error was exit 70; transformers 5.0 fails later, building the model
        ("intermediate_size", [128], ["cannot"]),
        ("hidden_act", 0, ["cannot"]),
        ("architectures", 12345, ["architectures must be a list"]),  # TypeError in is_causal_architecture: exit 70
        ("quantization_config", {"quant_method": 3}, ["quant_method"]),  # AttributeError .startswith: exit 70
    ],
)
def test_config_value_of_the_wrong_kind(fixtures, tmp_path, key, value, words):
    folder = _folder(fixtures, tmp_path)
    _edit_json(folder / "config.json", lambda c: c.__setitem__(key, value))
    _refused(folder, *words)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("vocab_size", 2**22, ["parameters", "the weights hold only"]),  # allocated 2 GB before refusing
        ("hidden_size", 4096, ["parameters"]),
        ("num_hidden_layers", 3000, ["3000 layers"]),  # built and initialised 3000 layers (seconds; hours for more)
        ("num_hidden_layers", 2**31 - 1, ["layers"]),
    ],
)
def test_config_far_larger_than_the_weights_is_refused_before_allocating(fixtures, tmp_path, key, value, words):
    folder = _folder(fixtures, tmp_path)
    _edit_json(folder / "config.json", lambda c: c.__setitem__(key, value))
    _refused(folder, *words, seconds=5.0)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize(
    "text, words",
    [
        ('{"a": ' + "9" * 5000 + "}", ["digits"]),  # ValueError, not a JSONDecodeError: exit 70
        ("[" * 100_000 + "]" * 100_000, ["recursion"]),  # RecursionError: exit 70
    ],
    ids=["huge-integer", "deep-nesting"],
)
def test_json_that_python_cannot_parse(fixtures, tmp_path, name, text, words):
    folder = _folder(fixtures, tmp_path, sharded=True)
    (folder / name).write_text(text)
    _refused(folder, name, *words)


def test_index_metadata_that_is_not_an_object(fixtures, tmp_path):
    folder = _folder(fixtures, tmp_path, sharded=True)
    _edit_json(folder / "model.safetensors.index.json", lambda d: d.__setitem__("metadata", 7))  # TypeError in transformers
    _refused(folder, "metadata is a JSON int")


def test_index_file_name_too_long_for_the_file_system(fixtures, tmp_path):
    folder = _folder(fixtures, tmp_path, sharded=True)

    def edit(index):
        key = next(iter(index["weight_map"]))
        index["weight_map"][key] = "x" * 300  # OSError ENAMETOOLONG: exit 70

    _edit_json(folder / "model.safetensors.index.json", edit)
    _refused(folder, "cannot be looked up", "File name too long")


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}], ids=["list", "object"])
def test_safetensors_dtype_that_is_not_a_string(fixtures, tmp_path, dtype):
    folder = _folder(fixtures, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n, header = fuzzing._split_safetensors(data)
    header["lm_head.weight"]["dtype"] = dtype  # TypeError (unhashable) in the header check: exit 70
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    _refused(folder, "lm_head.weight: unknown dtype")


def test_safetensors_header_with_a_huge_integer(fixtures, tmp_path):
    folder = _folder(fixtures, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n, _ = fuzzing._split_safetensors(data)
    raw = b'{"x": ' + b"9" * 5000 + b", " + data[9 : 8 + n]  # ValueError from json: exit 70
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    _refused(folder, "not valid JSON", "digits")


def _gguf(fixtures, tmp_path: Path) -> tuple[Path, bytearray]:
    path = tmp_path / "model.gguf"
    shutil.copyfile(fixtures.gguf, path)
    return path, bytearray(path.read_bytes())


def _kv(layout: fuzzing.GgufLayout, key: str) -> dict:
    return next(entry for entry in layout.kv if entry["key"] == key)


@pytest.mark.parametrize("key", ["general.architecture", "tokenizer.ggml.pre"])
def test_gguf_string_turned_array_does_not_hang(fixtures, layout, tmp_path, key):
    """A string's type set to array: the gguf package read its length as an element count and
    walked billions of elements (a hang)."""
    path, data = _gguf(fixtures, tmp_path)
    struct.pack_into("<I", data, _kv(layout, key)["type"], 9)
    path.write_bytes(data)
    _refused(path, "not a valid GGUF file", seconds=5.0)


@pytest.mark.parametrize("value, words", [(1000, ["1000 layers"]), (2**31 - 1, ["layers"])])
def test_gguf_block_count_beyond_its_tensors(fixtures, layout, tmp_path, value, words):
    """block_count 1000 built and initialised 1000 layers before the strict check (30+ s)."""
    path, data = _gguf(fixtures, tmp_path)
    struct.pack_into("<I", data, _kv(layout, "llama.block_count")["value"], value)
    path.write_bytes(data)
    _refused(path, *words, seconds=5.0)


@pytest.mark.parametrize(
    "part, value, words",
    [
        ("dim", 2**40, ["lies outside the file"]),
        ("dim", 2**64 - 1, ["lies outside the file"]),
        ("n_dims", 2**31, ["dimensions"]),
        ("type", 99, ["ggml type 99"]),
        ("offset", 2**64 - 32, ["lies outside the file"]),
        ("offset", 32, ["overlap"]),
        ("name_len", 2**40, ["past the end of the file"]),
    ],
)
def test_gguf_tensor_info_with_absurd_sizes(fixtures, layout, tmp_path, part, value, words):
    path, data = _gguf(fixtures, tmp_path)
    info = layout.tensors[3]
    pos = info["dims"][0] if part == "dim" else info[part]
    struct.pack_into("<I" if part in ("n_dims", "type") else "<Q", data, pos, value)
    path.write_bytes(data)
    _refused(path, "not a valid GGUF file", *words, seconds=5.0)


@pytest.mark.parametrize("field_pos, value, words", [(8, 2**63, ["tensors, more than the file holds"]), (16, 2**40, ["metadata entries"])])
def test_gguf_header_counts_beyond_the_file(fixtures, tmp_path, field_pos, value, words):
    path, data = _gguf(fixtures, tmp_path)
    struct.pack_into("<Q", data, field_pos, value)
    path.write_bytes(data)
    _refused(path, *words, seconds=5.0)


def test_gguf_array_count_beyond_the_file(fixtures, layout, tmp_path):
    path, data = _gguf(fixtures, tmp_path)
    struct.pack_into("<Q", data, _kv(layout, "tokenizer.ggml.tokens")["value"] + 4, 2**62)
    path.write_bytes(data)
    _refused(path, "tokenizer.ggml.tokens claims", seconds=5.0)


def test_gguf_vocabulary_that_its_merges_do_not_fit(fixtures, layout, tmp_path):
    """A token renamed so that a merge names a token the vocabulary lacks: the tokenizers library
    raised a plain Exception ("Token `Ġm` out of vocabulary"): exit 70."""
    path, data = _gguf(fixtures, tmp_path)
    tokens = _kv(layout, "tokenizer.ggml.tokens")
    needle = struct.pack("<Q", 3) + "Ġm".encode()
    where = data.index(needle, tokens["value"], tokens["end"])
    data[where + 8 : where + 11] = "Ġ\x7f".encode()
    path.write_bytes(data)
    _refused(path, "cannot load the tokenizer")  # newest: "out of vocabulary"; 5.0: a missing protobuf
