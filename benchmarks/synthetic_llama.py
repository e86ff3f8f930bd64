"""Write a LLaMA-architecture checkpoint with random bfloat16 weights, streaming, for scale tests.

    python benchmarks/synthetic_llama.py --shape llama-3.2-1b -o /tmp/synth-1b
    python benchmarks/synthetic_llama.py --shape llama-3.2-1b --layers 8 -o /tmp/synth-1b-8l
    python benchmarks/synthetic_llama.py --shape llama-3-8b --shard-size 5GB -o /tmp/synth-8b

The folder holds what a Hugging Face LLaMA checkpoint holds: sharded safetensors
(``model-0000X-of-0000N.safetensors``, metadata ``{"format": "pt"}``) with their
``model.safetensors.index.json``, a ``config.json`` (``LlamaConfig``, dtype bfloat16) and a
tokenizer.

Shapes (``--layers`` overrides the depth):

* ``llama-3.2-1b``: hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, tied
  embeddings, rope theta 500000.
* ``llama-3-8b``: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, untied
  embeddings, rope theta 500000.

Both use plain rope (no ``llama3`` frequency scaling) and 8192 positions; the real
LLaMA 3.2 checkpoints scale rope to 131072 positions, which changes no weight shape.

Vocabulary: the tokenizer is the packaged SmolLM2 model's (the folder ``compress`` converts
its GGUF into, under ``~/.cache/compress/gguf/``), which works offline; ``vocab_size``
defaults to that tokenizer's size, 49152. LLaMA 3's real vocabulary is 128256: ``--vocab
128256`` gives the embedding (and head) its real shape, the tokenizer then covering only
its first 49152 ids. A ``--vocab`` below 49152 makes most text fail in the embedding (the
tokenizer produces ids past it); it is only for checkpoints never run on text.

Weights: normal with std 0.02 (RMSNorm weights 1), drawn from ``--seed``. The safetensors
files are written directly: the header first (every shape is known beforehand), then one
tensor at a time, generated in row blocks of at most ``BLOCK_BYTES``, so the generator's
own memory stays at a few hundred MB whatever the model's size. The weights are random:
a checkpoint for measuring memory and time, not quality (perplexity is near the vocabulary
size).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SHAPES = {
    "llama-3.2-1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, tied=True),
    "llama-3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, tied=False),
}
ROPE_THETA = 500000.0
MAX_POSITIONS = 8192
RMS_NORM_EPS = 1e-5
STD = 0.02
BF16_BYTES = 2
BLOCK_BYTES = 128 * 1024**2  # float32 draw per block of rows
SMOLLM2_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    norm: bool  # an RMSNorm weight: ones, not random

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * BF16_BYTES


def tensor_specs(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool,
                 vocab: int) -> list[Spec]:
    """Every tensor of a LlamaForCausalLM, in the order a Hugging Face checkpoint lists them."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    specs = [Spec("model.embed_tokens.weight", (vocab, hidden), False)]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            Spec(p + "self_attn.q_proj.weight", (hidden, hidden), False),
            Spec(p + "self_attn.k_proj.weight", (kv, hidden), False),
            Spec(p + "self_attn.v_proj.weight", (kv, hidden), False),
            Spec(p + "self_attn.o_proj.weight", (hidden, hidden), False),
            Spec(p + "mlp.gate_proj.weight", (intermediate, hidden), False),
            Spec(p + "mlp.up_proj.weight", (intermediate, hidden), False),
            Spec(p + "mlp.down_proj.weight", (hidden, intermediate), False),
            Spec(p + "input_layernorm.weight", (hidden,), True),
            Spec(p + "post_attention_layernorm.weight", (hidden,), True),
        ]
    specs.append(Spec("model.norm.weight", (hidden,), True))
    if not tied:
        specs.append(Spec("lm_head.weight", (vocab, hidden), False))
    return specs


def plan_shards(specs: list[Spec], shard_bytes: int) -> list[list[Spec]]:
    """Consecutive tensors packed greedily: a new shard when the next tensor would pass shard_bytes."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def header_bytes(shard: list[Spec]) -> bytes:
    """The safetensors header: an 8-byte little-endian length, then JSON padded to 8 bytes."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in shard:
        entries[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensor(f, spec: Spec, gen: torch.Generator) -> None:
    """Draw the tensor in row blocks (float32 normal, rounded to bfloat16) and write its raw bytes."""
    if spec.norm:
        f.write(torch.ones(spec.shape, dtype=torch.bfloat16).view(torch.int16).numpy().data)
        return
    rows, cols = spec.shape[0], spec.numel // spec.shape[0]
    step = max(1, BLOCK_BYTES // (cols * 4))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = torch.empty((n, cols), dtype=torch.float32).normal_(0.0, STD, generator=gen)
        f.write(block.to(torch.bfloat16).view(torch.int16).numpy().data)
        del block


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB, 2GiB)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def find_tokenizer_dir() -> Path:
    """The folder of the packaged SmolLM2's converted GGUF, holding its tokenizer files.

    The folder this install converts into (compressor.loading.gguf_cache_dir) when it exists;
    else the newest converted SmolLM2 folder in the cache; else the model is loaded once,
    which converts it (~35 s, ~1.2 GB)."""
    from compressor import loading

    try:
        own = loading.gguf_cache_dir(loading._alias_path("smollm2-135m"))
        if (own / "tokenizer.json").is_file():
            return own
    except Exception:  # the alias's package missing: fall back to the cache
        own = None
    found = sorted(glob.glob(str(loading.cache_root() / "gguf" / "*" / "tokenizer.json")), key=os.path.getmtime)
    if found:
        return Path(found[-1]).parent
    return Path(loading.load_model("smollm2-135m").path)


def tokenizer_size(tokenizer_dir: Path) -> int | None:
    """One past the largest id tokenizer.json can produce (its vocabulary and added tokens)."""
    try:
        data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    ids = list((data.get("model") or {}).get("vocab", {}).values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def write_config(out: Path, shape: dict, vocab: int, tokenizer_dir: Path) -> None:
    from transformers import LlamaConfig

    ids = {}
    src = tokenizer_dir / "config.json"
    if src.is_file():
        known = json.loads(src.read_text())
        ids = {k: known[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if known.get(k) is not None}
        ids = {k: v for k, v in ids.items() if isinstance(v, int) and v < vocab}
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=shape["tied"],
        hidden_act="silu",
        initializer_range=STD,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
        **ids,
    )
    config.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--layers", type=int, help="override the shape's number of layers")
    ap.add_argument("--vocab", type=int, default=SMOLLM2_VOCAB,
                    help=f"vocabulary size (default {SMOLLM2_VOCAB}, the SmolLM2 tokenizer's; LLaMA 3: 128256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"),
                    help="largest shard before a new one begins (default 1GB; a larger tensor gets a shard alone)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = ap.parse_args(argv)

    shape = dict(SHAPES[args.shape])
    if args.layers is not None:
        if args.layers < 1:
            ap.error("--layers must be at least 1")
        shape["layers"] = args.layers
    if args.vocab < 1:
        ap.error("--vocab must be at least 1")
    out: Path = args.output
    if out.exists():
        if not args.overwrite:
            ap.error(f"{out} exists (use --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True)

    tokenizer_dir = find_tokenizer_dir()
    covered = tokenizer_size(tokenizer_dir)
    if covered and args.vocab < covered:
        print(f"warning: --vocab {args.vocab} is below the tokenizer's {covered} ids: text holding the "
              f"others fails in the embedding (index out of range)", file=sys.stderr)
    specs = tensor_specs(vocab=args.vocab, **shape)
    shards = plan_shards(specs, args.shard_size)
    total = len(shards)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{total:05d}.safetensors"
        tmp = out / (name + ".part")
        with open(tmp, "wb") as f:
            f.write(header_bytes(shard))
            for s in shard:
                write_tensor(f, s, gen)
                weight_map[s.name] = name
        tmp.rename(out / name)
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}: {len(shard)} tensors, "
              f"{sum(s.nbytes for s in shard) / 1e9:.3f} GB", flush=True)

    n_params = sum(s.numel for s in specs)
    data_bytes = sum(s.nbytes for s in specs)
    index = {"metadata": {"total_size": data_bytes, "total_parameters": n_params}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(out, shape, args.vocab, tokenizer_dir)
    for fname in TOKENIZER_FILES:
        if (tokenizer_dir / fname).is_file():
            shutil.copy2(tokenizer_dir / fname, out / fname)
    disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    summary = {
        "output": str(out.resolve()), "shape": args.shape, "layers": shape["layers"], "vocab": args.vocab,
        "tied_embeddings": shape["tied"], "parameters": n_params, "tensor_bytes": data_bytes,
        "safetensors_bytes_on_disk": disk, "shards": total, "tokenizer_from": str(tokenizer_dir),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
