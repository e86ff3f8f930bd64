"""Fuzzing the model readers: random corruptions of real files, each loaded by the CLI in-process.

Four readers, four targets: a safetensors weight file (of a single-file or a sharded tiny LLaMA
folder), the shard index ``model.safetensors.index.json``, ``config.json``, and a tiny LLaMA GGUF
file. Every case copies a clean fixture, damages it one way picked by its own seed, and runs
``compress analyze PATH --calib none`` under a time limit. What may come out:

* exit 3 (refused) or 4 (NaN/Inf weights), with exactly one ``error:`` line and no traceback;
* exit 0, only when the model holds what the files hold: for safetensors folders every tensor of
  the model equals the one the (damaged) files hold under its name, and every file tensor is used;
  for GGUF, two loads with different random seeds agree and no weight is left at a constant
  default (the fixture's weights are all random).

Anything else fails the case: another exit code (70 is an internal error), an exception escaping
``cli.run``, a case that runs past its time limit, or one whose peak memory grows by gigabytes.

Used by ``tests/test_fuzz_readers.py`` (a few dozen cases per reader) and by
``benchmarks/fuzz_readers.py`` (longer runs, and reproducing a single case).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

READERS = ("safetensors", "index", "config", "gguf")
ALLOWED_CODES = (0, 3, 4)
MEMORY_GROWTH_LIMIT = 1 << 30  # bytes of peak-memory growth in one case that count as a failure

# Values a damaged JSON file may hold where a sensible one was.
NASTY_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 7, 2**31, 2**32 + 1, 2**63, 2**64 + 3, -(2**63), 10**30, 1e308, -1e308,
    0.5, float("nan"), float("inf"), float("-inf"), "", "x", "F32", "../../../etc/passwd", "/etc/passwd", "..",
    "a/b", "a\\b", "\x00", "é✓ü", "\ud800", "x" * 300, [], {}, [1, 2, 3], [[64]], {"a": 1}, [None], ["F32"],
)
SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "F4", "C64", "Q4", "f32", "")


@dataclass(frozen=True)
class Case:
    reader: str
    seed: int
    index: int

    @property
    def key(self) -> str:
        return f"{self.reader}/{self.seed}/{self.index}"

    def rng(self) -> random.Random:
        return random.Random(self.key)  # a str seed hashes the same way in every run


@dataclass
class Outcome:
    reader: str
    seed: int
    index: int
    mutation: str
    code: int | None  # None: no exit code (an exception escaped, or the time ran out)
    verdict: str  # "loaded", "refused", "non-finite" (all fine) or "FAIL"
    why: str = ""  # for a failure: what went wrong
    error_line: str = ""
    seconds: float = 0.0
    data_only: bool = False  # the damage touched tensor data only (headers, metadata and JSON intact)
    stderr_tail: str = ""  # for a failure: the end of what the command wrote to stderr

    @property
    def failed(self) -> bool:
        return self.verdict == "FAIL"

    def reproduce(self) -> str:
        return f"python benchmarks/fuzz_readers.py --reader {self.reader} --seed {self.seed} --case {self.index} --keep"


@dataclass
class Fixtures:
    single: Path  # tiny LLaMA folder, one model.safetensors
    sharded: Path  # the same weights in shards with model.safetensors.index.json
    gguf: Path  # a tiny LLaMA GGUF file (F32 tensors, byte-level BPE tokenizer)
    gguf_constant: frozenset[str] = field(default_factory=frozenset)  # weights constant in the clean GGUF's load


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs too long (a BaseException: no ``except Exception`` stops it)."""


# --------------------------------------------------------------------------------------------
# Fixtures


def _gguf_tensor_names(layers: int) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for i in range(layers):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    return names


def write_tiny_gguf(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    """Write a LLaMA model (untied, float32) and its byte-level BPE tokenizer as a GGUF file with
    the ``gguf`` package. The norm weights are randomised first, so that every weight of the file
    differs from any constant a loader could initialise it with."""
    import gguf

    config = model.config
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    for name, tensor in state.items():
        if name.endswith("norm.weight"):
            tensor += 0.1 * torch.randn(tensor.shape, generator=generator)
    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [""] * len(vocab["vocab"])
    for token, i in vocab["vocab"].items():
        tokens[i] = token
    tokens += [f"[PAD{i}]" for i in range(len(tokens), config.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    specials = {tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    for hf_name, gguf_name in _gguf_tensor_names(config.num_hidden_layers).items():
        writer.add_tensor(gguf_name, state[hf_name].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_fixtures(root: Path, model: torch.nn.Module, tokenizer, single: Path | None = None,
                   sharded: Path | None = None) -> Fixtures:
    """The clean inputs under ``root``: the given folders (saved from ``model`` when None) and a GGUF.
    Checks that each clean input loads (exit 0), and notes the GGUF load's constant weights."""
    root.mkdir(parents=True, exist_ok=True)
    if single is None:
        single = root / "single"
        model.save_pretrained(single)
        tokenizer.save_pretrained(single)
    if sharded is None:
        sharded = root / "sharded"
        model.save_pretrained(sharded, max_shard_size="50KB")
        tokenizer.save_pretrained(sharded)
    gguf_path = write_tiny_gguf(model, tokenizer, root / "tiny-llama.gguf")
    with _fresh_cache(root / "clean-cache"):
        from compressor import load_model

        state = load_model(str(gguf_path)).model.state_dict()
    constant = frozenset(name for name, t in state.items() if t.numel() > 1 and bool((t == t.flatten()[0]).all()))
    return Fixtures(single, sharded, gguf_path, constant)


@contextlib.contextmanager
def _fresh_cache(path: Path):
    """COMPRESS_CACHE pointed at ``path`` (emptied), so that a GGUF is converted again."""
    shutil.rmtree(path, ignore_errors=True)
    saved = os.environ.get("COMPRESS_CACHE")
    os.environ["COMPRESS_CACHE"] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("COMPRESS_CACHE", None)
        else:
            os.environ["COMPRESS_CACHE"] = saved
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Byte-level mutations


def _flip(data: bytearray, rng: random.Random, start: int, end: int, count: int) -> list[int]:
    """XOR (or overwrite) ``count`` random bytes in data[start:end]; the positions changed."""
    end = min(end, len(data))
    if end <= start:
        return []
    where = sorted(rng.randrange(start, end) for _ in range(count))
    for i in where:
        data[i] = rng.randrange(256) if rng.random() < 0.3 else data[i] ^ (1 << rng.randrange(8) if rng.random() < 0.6 else rng.randrange(1, 256))
    return where


def _garbage(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _byte_mutation(data: bytearray, rng: random.Random, regions: dict[str, tuple[int, int]]) -> str:
    """One random byte-level damage to ``data`` in place: a flip in a named region, a truncation,
    or appended garbage. Returns what was done."""
    kind = rng.choice(["flip", "flip", "flip", "truncate", "append"])
    if kind == "truncate":
        region = rng.choice(list(regions))
        lo, hi = regions[region]
        cut = rng.randrange(lo, max(lo + 1, hi))
        del data[cut:]
        return f"truncate at {cut} (in {region})"
    if kind == "append":
        n = rng.choice([1, 7, 64, 4096])
        data.extend(_garbage(rng, n))
        return f"append {n} garbage bytes"
    region = rng.choice(list(regions))
    lo, hi = regions[region]
    where = _flip(data, rng, lo, hi, rng.choice([1, 1, 2, 8]))
    return f"flip bytes {where} (in {region})"


# --------------------------------------------------------------------------------------------
# JSON mutations


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) into a JSON value, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(obj, list) and len(obj) <= 50:
        for i, v in enumerate(obj):
            out.extend(_paths(v, prefix + (i,)))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(obj, path[:-1])[path[-1]] = value
    return obj


def _nasty(rng: random.Random, old: Any = None) -> Any:
    if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.5:
        return rng.choice([0, -old, old + 1, old - 1, old * 2, old * 1000, old // 2, 2**31 - 1, 2**40])
    return copy.deepcopy(rng.choice(NASTY_VALUES))


def _json_edit(obj: Any, rng: random.Random, focus: list[tuple] | None = None) -> tuple[Any, str]:
    """One structural edit of a parsed JSON value: drop a key, rename it, replace a value, wrap it
    in a list, or replace the whole document. ``focus`` (paths) is where to edit most often."""
    paths = focus if focus and rng.random() < 0.7 else _paths(obj)
    path = rng.choice(paths)
    target = _get(obj, path)
    op = rng.choice(["replace", "replace", "replace", "drop", "rename", "wrap", "add"])
    if op == "drop" and path:
        parent = _get(obj, path[:-1])
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
        return obj, f"drop {list(path)}"
    if op == "rename" and path and isinstance(_get(obj, path[:-1]), dict):
        parent = _get(obj, path[:-1])
        new = rng.choice(["", "x", path[-1] + "x", path[-1].upper(), "é✓", "\ud800", "../" + path[-1], "__metadata__"])
        parent[new] = parent.pop(path[-1])
        return obj, f"rename {list(path)} to {new!r}"
    if op == "wrap":
        return _set(obj, path, [target]), f"wrap {list(path)} in a list"
    if op == "add" and isinstance(target, dict):
        key = rng.choice(["x", "", "é✓", "\ud800", "weight_map", "model_type", "__metadata__", "a" * 300])
        value = _nasty(rng)
        target[key] = value
        return obj, f"add {key!r}: {value!r} at {list(path)}"
    value = _nasty(rng, target)
    return _set(obj, path, value), f"set {list(path)} to {value!r}"


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2)  # NaN and Infinity as Python writes them; lone surrogates escaped


def _raw_json_damage(text: str, rng: random.Random) -> tuple[bytes, str]:
    """Damage a JSON document's text: duplicate a key, nest deeply, hold a huge integer, break
    its bytes (flip, cut, invalid UTF-8, a BOM), or replace it."""
    op = rng.choice(["duplicate", "deep", "huge_int", "flip", "cut", "utf8", "bom", "replace"])
    raw = text.encode("utf-8", "surrogatepass")
    if op == "duplicate" and text.lstrip().startswith("{"):
        first = json.loads(text)
        if isinstance(first, dict) and first:
            key = rng.choice(list(first))
            brace = text.index("{")
            dup = f"{json.dumps(key)}: {json.dumps(first[key])}, "
            return (text[: brace + 1] + dup + text[brace + 1 :]).encode(), f"duplicate key {key!r}"
    if op == "deep":
        depth = rng.choice([1000, 100_000])
        return (f'{{"deep": {"[" * depth}{"]" * depth}}}' if rng.random() < 0.5 else "[" * depth + "]" * depth).encode(), f"nest {depth} deep"
    if op == "huge_int":
        digits = rng.choice([30, 5000])
        return text.replace(":", f": {'9' * digits}, \"_\":", 1).encode(), f"an integer of {digits} digits"
    if op == "flip":
        data = bytearray(raw)
        where = _flip(data, rng, 0, len(data), rng.choice([1, 3]))
        return bytes(data), f"flip bytes {where}"
    if op == "cut":
        cut = rng.randrange(0, len(raw))
        return raw[:cut], f"truncate at {cut}"
    if op == "utf8":
        i = rng.randrange(0, len(raw))
        return raw[:i] + b"\xff\xfe\xc0" + raw[i:], f"invalid UTF-8 at {i}"
    if op == "bom":
        return b"\xef\xbb\xbf" + raw, "a UTF-8 BOM first"
    choice = rng.choice([b"", b"null", b"[]", b"42", b'"text"', b"\x00" * 16, _garbage(rng, 64)])
    return choice, f"replace the file with {choice[:16]!r}"


def mutate_json_file(path: Path, rng: random.Random, focus: Callable[[Any], list[tuple]] | None = None) -> str:
    """Damage a JSON file in place: structural edits (parsed and written again) or raw damage."""
    obj = json.loads(path.read_text(encoding="utf-8"))
    if rng.random() < 0.7:
        done = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            obj, what = _json_edit(obj, rng, focus(obj) if focus else None)
            done.append(what)
        path.write_bytes(_dump(obj).encode("utf-8", "surrogatepass"))
        return "; ".join(done)
    raw, what = _raw_json_damage(_dump(obj), rng)
    path.write_bytes(raw)
    return what


def _index_focus(obj: Any) -> list[tuple]:
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict):
        return []
    return [("weight_map",)] + [("weight_map", k) for k in weight_map]


_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "head_dim", "model_type", "architectures", "tie_word_embeddings",
                "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "dtype", "torch_dtype",
                "quantization_config", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "auto_map")


def _config_focus(obj: Any) -> list[tuple]:
    if not isinstance(obj, dict):
        return []
    return [(k,) for k in _CONFIG_KEYS if k in obj]


def mutate_config(path: Path, rng: random.Random) -> str:
    if rng.random() < 0.15:  # keys that switch loaders or ask for remote code
        obj = json.loads(path.read_text(encoding="utf-8"))
        key, value = rng.choice([
            ("quantization_config", {"quant_method": rng.choice(["gptq", "compress-factored", "awq", "bitsandbytes", 3, None])}),
            ("quantization_config", rng.choice([[], "gptq", {"quant_method": "gptq", "bits": 99}])),
            ("auto_map", {"AutoModelForCausalLM": "../../evil.Model"}),
            ("model_type", rng.choice(["gpt2", "bert", "mistral", "qwen2", "llama4", "nonexistent", ""])),
            ("architectures", rng.choice([["BertModel"], ["Nope"], "LlamaForCausalLM", [], [None]])),
        ])
        obj[key] = value
        path.write_bytes(_dump(obj).encode("utf-8", "surrogatepass"))
        return f"set {key} to {value!r}"
    return mutate_json_file(path, rng, _config_focus)


# --------------------------------------------------------------------------------------------
# Safetensors


def _split_safetensors(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def mutate_safetensors(path: Path, rng: random.Random) -> tuple[str, bool]:
    """Damage a safetensors file in place. Returns what was done and whether only tensor data
    (never the 8-byte length or the header) changed."""
    data = bytearray(path.read_bytes())
    n, header = _split_safetensors(bytes(data))
    payload = bytes(data[8 + n :])
    kind = rng.choice(["length", "header_bytes", "data", "data", "truncate", "append", "json", "json", "json", "raw_json"])
    if kind == "length":
        where = _flip(data, rng, 0, 8, rng.choice([1, 2]))
        if rng.random() < 0.3:
            value = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), 2**32, 2**63, 2**64 - 1])
            data[:8] = struct.pack("<Q", value)
            path.write_bytes(data)
            return f"header length set to {value}", False
        path.write_bytes(data)
        return f"flip length bytes {where}", False
    if kind == "header_bytes":
        where = _flip(data, rng, 8, 8 + n, rng.choice([1, 1, 3]))
        path.write_bytes(data)
        return f"flip header bytes {where}", False
    if kind == "data":
        where = _flip(data, rng, 8 + n, len(data), rng.choice([1, 4, 32]))
        path.write_bytes(data)
        return f"flip data bytes {where}", True
    if kind == "truncate":
        cut = rng.choice([rng.randrange(0, 8), rng.randrange(8, 8 + n), rng.randrange(8 + n, len(data))])
        path.write_bytes(data[:cut])
        return f"truncate at {cut} of {len(data)}", False
    if kind == "append":
        extra = _garbage(rng, rng.choice([1, 8, 100, 4096]))
        path.write_bytes(bytes(data) + extra)
        return f"append {len(extra)} garbage bytes", False
    if kind == "raw_json":
        text = json.dumps(header)
        raw, what = _raw_json_damage(text, rng)
    else:
        header, what = _safetensors_json_edit(header, rng)
        raw = json.dumps(header).encode("utf-8", "surrogatepass")
    if rng.random() < 0.2:
        raw += b" " * rng.randrange(1, 8)  # safetensors pads its header with spaces
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return f"header JSON: {what}", False


def _safetensors_json_edit(header: dict, rng: random.Random) -> tuple[dict, str]:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["dtype", "shape", "offsets", "swap", "drop", "rename", "add", "metadata", "generic"])
    if op == "dtype":
        entry["dtype"] = rng.choice(SAFETENSORS_DTYPES + (None, 3, ["F32"]))
        return header, f"{name} dtype → {entry['dtype']!r}"
    if op == "shape":
        shape = list(entry["shape"])
        choice = rng.choice(["reverse", "add", "drop", "value", "replace"])
        if choice == "reverse":
            shape.reverse()
        elif choice == "add":
            shape.append(rng.choice([1, 2]))
        elif choice == "drop" and shape:
            shape.pop()
        elif choice == "value" and shape:
            shape[rng.randrange(len(shape))] = _nasty(rng, shape[0])
        else:
            shape = _nasty(rng)
        entry["shape"] = shape
        return header, f"{name} shape → {shape!r}"
    if op == "offsets":
        offsets = list(entry["data_offsets"])
        choice = rng.choice(["shift", "swap", "value", "replace", "length"])
        if choice == "shift":
            delta = rng.choice([-4, 4, 8, 256])
            offsets = [offsets[0] + delta, offsets[1] + delta]
        elif choice == "swap":
            offsets.reverse()
        elif choice == "value":
            offsets[rng.randrange(2)] = _nasty(rng, offsets[1])
        elif choice == "length":
            offsets.append(offsets[1])
        else:
            offsets = _nasty(rng)
        entry["data_offsets"] = offsets
        return header, f"{name} data_offsets → {offsets!r}"
    if op == "swap" and len(names) > 1:
        other = rng.choice([k for k in names if k != name])
        header[name], header[other] = header[other], header[name]
        return header, f"swap the entries of {name} and {other}"
    if op == "drop":
        del header[name]
        return header, f"drop {name}"
    if op == "rename":
        new = rng.choice([name + ".x", name.upper(), "é✓" + name, "\ud800", "", "__metadata__", name.replace("layers.0", "layers.9")])
        header[new] = header.pop(name)
        return header, f"rename {name} to {new!r}"
    if op == "add":
        header[name + ".extra"] = dict(entry)
        return header, f"add a copy of {name}'s entry"
    if op == "metadata":
        value = rng.choice([{"format": "pt", "n": 1}, [], "pt", {"format": None}, {"\ud800": "x"}, None, {"format": "tf"}])
        header["__metadata__"] = value
        return header, f"__metadata__ → {value!r}"
    return _json_edit(header, rng)


# --------------------------------------------------------------------------------------------
# GGUF


_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class GgufLayout:
    """Byte positions in a (clean) GGUF file, for targeted damage."""

    kv: list[dict]  # per metadata entry: key_len (pos of its u64 length), type (u32), value, end; key
    tensors: list[dict]  # per tensor info: name_len, n_dims, dims (list), type, offset, end
    kv_region: tuple[int, int]
    tensor_region: tuple[int, int]
    data_start: int
    size: int


def gguf_layout(data: bytes) -> GgufLayout:
    """Walk a well-formed GGUF v3 file (our own small parser; only for the clean fixture)."""
    pos = 24
    (n_tensors, n_kv) = struct.unpack_from("<QQ", data, 8)

    def string(p: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", data, p)
        return data[p + 8 : p + 8 + length].decode(), p + 8 + length

    def value(p: int, kind: int) -> int:
        if kind in _GGUF_FIXED:
            return p + _GGUF_FIXED[kind]
        if kind == 8:
            return string(p)[1]
        element, count = struct.unpack_from("<IQ", data, p)
        p += 12
        for _ in range(count):
            p = value(p, element)
        return p

    kv = []
    alignment = 32
    for _ in range(n_kv):
        start = pos
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        end = value(pos + 4, kind)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", data, pos + 4)
        kv.append({"key": key, "key_len": start, "type": pos, "value": pos + 4, "kind": kind, "end": end})
        pos = end
    kv_region = (24, pos)
    tensors = []
    for _ in range(n_tensors):
        start = pos
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = [pos + 4 + 8 * i for i in range(n_dims)]
        kind_pos = pos + 4 + 8 * n_dims
        tensors.append({"name": name, "name_len": start, "n_dims": pos, "dims": dims, "type": kind_pos,
                        "offset": kind_pos + 4, "end": kind_pos + 12})
        pos = kind_pos + 12
    data_start = (pos + alignment - 1) // alignment * alignment
    return GgufLayout(kv, tensors, kv_region, (kv_region[1], pos), data_start, len(data))


def mutate_gguf(path: Path, rng: random.Random, layout: GgufLayout) -> tuple[str, bool]:
    """Damage a GGUF file in place: flips in its header, metadata, tensor infos or data; targeted
    rewrites of counts, lengths, types, dimensions and offsets; truncation; garbage. Returns what
    was done and whether only tensor data changed."""
    data = bytearray(path.read_bytes())
    kind = rng.choice(["bytes", "bytes", "data", "header", "kv", "kv", "kv_value", "tensor", "tensor"])
    if kind == "bytes":
        regions = {"header": (0, 24), "metadata": layout.kv_region, "tensor infos": layout.tensor_region,
                   "data": (layout.data_start, layout.size)}
        what = _byte_mutation(data, rng, regions)
        path.write_bytes(data)
        return what, what.endswith("(in data)") and what.startswith("flip")
    if kind == "data":
        where = _flip(data, rng, layout.data_start, layout.size, rng.choice([1, 8, 64]))
        path.write_bytes(data)
        return f"flip data bytes {where}", True
    if kind == "header":
        field_name, fmt, pos = rng.choice([("magic", "<I", 0), ("version", "<I", 4), ("tensor count", "<Q", 8), ("kv count", "<Q", 16)])
        old = struct.unpack_from(fmt, data, pos)[0]
        new = rng.choice([0, 1, 2, old + 1, old - 1 if old else 7, 2**31, (1 << (8 * struct.calcsize(fmt))) - 1])
        struct.pack_into(fmt, data, pos, new)
        path.write_bytes(data)
        return f"{field_name} {old} → {new}", False
    if kind in ("kv", "kv_value"):
        entry = rng.choice(layout.kv)
        if kind == "kv":
            part = rng.choice(["key_len", "type"])
            fmt = "<Q" if part == "key_len" else "<I"
            old = struct.unpack_from(fmt, data, entry[part])[0]
            new = rng.choice([0, old + 1, old - 1, 9 if part == "type" else 2**40, rng.randrange(0, 20), 2**32 - 1, 2**63])
            new = new % (1 << (8 * struct.calcsize(fmt)))
            struct.pack_into(fmt, data, entry[part], new)
            path.write_bytes(data)
            return f"metadata {entry['key']}: {part} {old} → {new}", False
        pos, end, k = entry["value"], entry["end"], entry["kind"]
        if k in _GGUF_FIXED and k != 6 and k != 12:  # an integer: a new value of its width
            width = _GGUF_FIXED[k]
            new = rng.choice([0, 1, 2, 3, 1000, 2**31 - 1, 2**(8 * width) - 1, rng.randrange(2**(8 * width))]) % (1 << (8 * width))
            data[pos : pos + width] = new.to_bytes(width, "little")
            what = f"metadata {entry['key']} → {new}"
        elif k in (6, 12):
            new = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30])
            struct.pack_into("<f" if k == 6 else "<d", data, pos, new)
            what = f"metadata {entry['key']} → {new}"
        else:  # a string's length, an array's element type or count
            field_pos, fmt = (pos, "<Q") if k == 8 else rng.choice([(pos, "<I"), (pos + 4, "<Q")])
            old = struct.unpack_from(fmt, data, field_pos)[0]
            new = rng.choice([0, old + 1, old - 1, old * 2, 2**31, 2**62]) % (1 << (8 * struct.calcsize(fmt)))
            struct.pack_into(fmt, data, field_pos, new)
            what = f"metadata {entry['key']}: a length/type {old} → {new}"
        path.write_bytes(data)
        return what, False
    info = rng.choice(layout.tensors)
    part = rng.choice(["name_len", "n_dims", "dim", "dim", "type", "offset", "offset"])
    if part == "dim":
        pos, fmt = rng.choice(info["dims"]), "<Q"
    else:
        pos, fmt = info[part], ("<I" if part in ("n_dims", "type") else "<Q")
    old = struct.unpack_from(fmt, data, pos)[0]
    choices = {
        "name_len": [0, old + 1, old - 1, 2**40],
        "n_dims": [0, 1, 3, 4, 5, 2**31],
        "dim": [0, 1, old * 2, old + 1, 2**31, 2**40, 2**62, 2**64 - 1],
        "type": [1, 2, 3, 6, 8, 10, 12, 14, 16, 20, 30, 39, 99, 2**31],
        "offset": [0, old + 32, old + 1, old + 2**20, 2**40, 2**64 - 32, max(0, old - 32)],
    }[part]
    new = rng.choice(choices) % (1 << (8 * struct.calcsize(fmt)))
    struct.pack_into(fmt, data, pos, new)
    path.write_bytes(data)
    return f"tensor {info['name']}: {part} {old} → {new}", False


# --------------------------------------------------------------------------------------------
# Running a case


def _prepare(case: Case, fixtures: Fixtures, work: Path, layout: GgufLayout | None) -> tuple[Path, str, bool]:
    """Copy the fixture the case damages into ``work`` and damage it: (model path, what, data only)."""
    rng = case.rng()
    if case.reader == "gguf":
        target = work / "model.gguf"
        shutil.copyfile(fixtures.gguf, target)
        what, data_only = mutate_gguf(target, rng, layout or gguf_layout(fixtures.gguf.read_bytes()))
        return target, what, data_only
    sharded = case.reader == "index" or (case.reader != "config" and rng.random() < 0.35) or (case.reader == "config" and rng.random() < 0.15)
    folder = work / "model"
    shutil.copytree(fixtures.sharded if sharded else fixtures.single, folder)
    if case.reader == "safetensors":
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        name = rng.choice(files)
        what, data_only = mutate_safetensors(folder / name, rng)
        return folder, f"{name}: {what}", data_only
    if case.reader == "index":
        return folder, mutate_json_file(folder / "model.safetensors.index.json", rng, _index_focus), False
    return folder, f"{'sharded ' if sharded else ''}config.json: {mutate_config(folder / 'config.json', rng)}", False


@contextlib.contextmanager
def _time_limit(seconds: float):
    def expired(signum, frame):
        raise CaseTimeout(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``cli.run(argv)`` in-process: (exit code, what it wrote to stderr)."""
    from compressor import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.run(argv)
    return code, err.getvalue()


def run_case(case: Case, fixtures: Fixtures, work: Path, time_limit: float = 30.0,
             layout: GgufLayout | None = None, keep: bool = False) -> Outcome:
    """Damage a copy of a fixture, run ``compress analyze`` on it, and judge what came out."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path, what, data_only = _prepare(case, fixtures, work, layout)
    outcome = Outcome(case.reader, case.seed, case.index, what, None, "FAIL", data_only=data_only)
    peak = _peak_bytes()
    start = time.perf_counter()
    err = ""
    try:
        with _fresh_cache(work / "cache"), _time_limit(time_limit):
            code, err = run_cli(["analyze", str(path), "--calib", "none"])
            outcome.code = code
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            outcome.error_line = errors[0] if errors else ""
            if code not in ALLOWED_CODES:
                outcome.why = f"exit {code}: {outcome.error_line or err[-300:]}"
            elif code == 0:
                problem = check_loaded(case.reader, path, fixtures, work)
                outcome.why = problem or ""
                outcome.verdict = "loaded" if problem is None else "FAIL"
            elif len(errors) != 1 or "Traceback" in err:
                outcome.why = f"exit {code} without exactly one error line: {err[-500:]!r}"
            else:
                outcome.verdict = "refused" if code == 3 else "non-finite"
    except CaseTimeout as e:
        outcome.why = f"hang: {e}"
        err += traceback.format_exc()
    except BaseException as e:  # noqa: BLE001 - anything escaping cli.run is what the fuzzer looks for
        if isinstance(e, KeyboardInterrupt):
            raise
        outcome.why = f"{type(e).__name__} escaped cli.run: {str(e)[:300]}"
        err += traceback.format_exc()
    outcome.seconds = time.perf_counter() - start
    grown = _peak_bytes() - peak
    if grown > MEMORY_GROWTH_LIMIT and not outcome.failed:
        outcome.verdict, outcome.why = "FAIL", f"peak memory grew by {grown / 2**30:.1f} GiB"
    if "allocate" in outcome.error_line and not outcome.failed:
        outcome.verdict, outcome.why = "FAIL", "tried to allocate more memory than there is"
    if outcome.failed:
        outcome.stderr_tail = err[-3000:]
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return outcome


# --------------------------------------------------------------------------------------------
# Exit 0: did the model load exactly what the files hold?


def check_loaded(reader: str, path: Path, fixtures: Fixtures, work: Path) -> str | None:
    """None when the model ``path`` loads to holds exactly the files' tensors, else what is wrong."""
    if reader == "gguf":
        return _check_gguf(path, fixtures, work)
    return _check_folder(path)


def _check_folder(folder: Path) -> str | None:
    from safetensors import safe_open

    from compressor import load_model

    files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else sorted(folder.glob("*.safetensors"))
    held: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    held[key] = f.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            return f"exit 0, but safetensors cannot read {file.name}: {str(e)[:200]}"
    state = load_model(str(folder)).model.state_dict()
    by_storage = {t.data_ptr(): name for name, t in state.items() if name in held}
    for name, tensor in state.items():
        if name in held:
            if held[name].shape != tensor.shape or not torch.equal(held[name].to(tensor.dtype), tensor):
                return f"exit 0, but {name} differs from the file's tensor of that name"
        elif tensor.data_ptr() not in by_storage:
            return f"exit 0, but {name} is not in the files (initialised, not loaded)"
    unused = sorted(set(held) - set(state))
    if unused:
        return f"exit 0, but the model ignores {unused[:3]} of the files"
    return None


def _check_gguf(path: Path, fixtures: Fixtures, work: Path) -> str | None:
    from compressor import load_model

    states = []
    for seed in (1, 2):
        with _fresh_cache(work / f"check-cache-{seed}"):
            torch.manual_seed(seed)
            states.append(load_model(str(path)).model.state_dict())
    first, second = states
    if set(first) != set(second):
        return "exit 0, but two loads give different weights"
    for name in first:
        if not torch.equal(first[name], second[name]):
            return f"exit 0, but {name} changes with the random seed (randomly initialised)"
        t = first[name]
        if name not in fixtures.gguf_constant and t.numel() > 1 and bool((t == t.flatten()[0]).all()):
            return f"exit 0, but {name} is constant ({t.flatten()[0].item()}): initialised, not loaded"
    return None


# --------------------------------------------------------------------------------------------
# Many cases


def run_cases(readers: list[str], cases: int, seed: int, fixtures: Fixtures, work: Path, time_limit: float = 30.0,
              deadline: float | None = None, only: int | None = None, keep: bool = False,
              report: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """``cases`` cases per reader (or only case ``only``), stopping at ``deadline`` (perf_counter)."""
    layout = gguf_layout(fixtures.gguf.read_bytes())
    indices = [only] if only is not None else list(range(cases))
    outcomes = []
    for i in indices:  # interleaved, so that a deadline cuts every reader short alike
        for reader in readers:
            if deadline is not None and time.perf_counter() > deadline:
                return outcomes
            outcome = run_case(Case(reader, seed, i), fixtures, work / f"{reader}-{i}", time_limit, layout, keep)
            outcomes.append(outcome)
            if report:
                report(outcome)
    return outcomes


def summarize(outcomes: list[Outcome]) -> dict:
    """Per reader: cases, outcome counts, exit codes, how many loads followed damage to more than
    tensor data (a header, metadata or JSON edit that left a valid input), seconds; every failure in full."""
    readers: dict[str, dict] = {}
    for o in outcomes:
        r = readers.setdefault(o.reader, {"cases": 0, "outcomes": {}, "exit_codes": {}, "loaded_after_damage_beyond_data": 0,
                                          "seconds": 0.0})
        r["cases"] += 1
        r["loaded_after_damage_beyond_data"] += o.verdict == "loaded" and not o.data_only
        r["outcomes"][o.verdict] = r["outcomes"].get(o.verdict, 0) + 1
        code = "none" if o.code is None else str(o.code)
        r["exit_codes"][code] = r["exit_codes"].get(code, 0) + 1
        r["seconds"] += o.seconds
    for r in readers.values():
        r["seconds"] = round(r["seconds"], 1)
    return {
        "readers": readers,
        "cases": len(outcomes),
        "failures": [dict(asdict(o), reproduce=o.reproduce()) for o in outcomes if o.failed],
    }
