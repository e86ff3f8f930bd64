"""``--calib SPEC`` → a [N, L] tensor of token ids, recorded with where it came from.

SPEC is a ``.txt`` file, a ``.jsonl`` file with a "text" field, ``hf:NAME[:CONFIG[:SPLIT]]``,
or ``self`` (text the model samples from its BOS token, so that no data is needed).
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compressor.errors import InvalidInputError, UsageError
from compressor.math.sampling import sample_top_p
from compressor.options import CalibrationOptions
from compressor.precision import autocast_to
from compressor.progress import track
from compressor.residency import release

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationInfo:
    spec: str
    samples: int
    seq_len: int
    seed: int
    tokens: int
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [samples, seq_len], int64
    info: CalibrationInfo

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.input_ids.split(batch_size))


def load_calibration(
    options: CalibrationOptions,
    tokenizer,
    model=None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> CalibrationSet:
    """The calibration windows ``options`` ask for (already validated when they were made).

    ``model``: the model that generates ``self`` calibration; ``compute_dtype``: its autocast dtype
    while it generates."""
    spec, samples, seq_len, seed = options.spec, options.samples, options.seq_len, options.seed
    if spec == "self":
        if model is None:
            raise UsageError("--calib self needs the model to generate from")
        return _self_generated(model, tokenizer, samples, seq_len, seed, compute_dtype)
    if spec.startswith("hf:"):
        text = _hf_text(spec)
    else:
        path = Path(spec)
        text = _jsonl_text(path) if path.suffix.lower() == ".jsonl" else read_text(path, "calibration")
    ids = tokenize_text(tokenizer, text)
    return _random_windows(ids, spec, samples, seq_len, seed)


def read_text(path: str | Path, what: str = "data") -> str:
    """A whole UTF-8 text file; ``what`` names it in the error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"cannot read {path}: {e}") from e
    if not text.strip():
        raise InvalidInputError(f"{what} file {path} holds no text")
    return text


def _jsonl_text(path: Path) -> str:
    texts = []
    for number, line in enumerate(read_text(path, "calibration").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InvalidInputError(f'{path}:{number}: each line needs a string "text" field')
        texts.append(record["text"])
    return "\n\n".join(texts)


def _hf_text(spec: str) -> str:
    parts = spec[3:].split(":")  # hf:NAME[:CONFIG[:SPLIT]], its syntax checked by CalibrationOptions
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (
        parts[2] if len(parts) > 2 else "train"
    )
    try:
        import datasets
    except ImportError as e:
        raise InvalidInputError("hf: calibration needs the datasets package: pip install 'compress-llm[hf]'") from e
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many unrelated types for a missing network or name
        raise InvalidInputError(f"cannot load dataset {spec!r} (is the network reachable?): {e}") from e
    if "text" not in data.column_names:
        raise InvalidInputError(f"dataset {spec!r} has no 'text' column (columns: {data.column_names})")
    return "\n\n".join(t for t in data["text"] if t)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text, tokenized once, without special tokens."""
    if not text.strip():
        raise InvalidInputError("the text is empty")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _random_windows(ids: torch.Tensor, spec: str, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    available = ids.numel() // seq_len
    if available < samples:
        raise InvalidInputError(
            f"{spec} holds {ids.numel()} tokens: {available} windows of {seq_len}, fewer than the "
            f"{samples} asked for; lower --calib-samples or --seq-len"
        )
    windows = ids[: available * seq_len].view(available, seq_len)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:samples].sort().values
    info = CalibrationInfo(spec=spec, samples=samples, seq_len=seq_len, seed=seed, tokens=samples * seq_len)
    return CalibrationSet(windows[chosen].clone(), info)


def _self_generated(
    model, tokenizer, samples: int, seq_len: int, seed: int, compute_dtype: torch.dtype | None = None
) -> CalibrationSet:
    """Sample ``samples`` sequences of ``seq_len`` tokens from the model itself, starting at BOS."""
    info = CalibrationInfo(spec="self", samples=samples, seq_len=seq_len, seed=seed, tokens=samples * seq_len)
    generator = torch.Generator().manual_seed(seed)
    can_generate = hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()
    if not can_generate:
        vocab = model.get_input_embeddings().num_embeddings
        log.warning("%s cannot generate text; --calib self uses random tokens", type(model).__name__)
        ids = torch.randint(0, vocab, (samples, seq_len), generator=generator)
        return CalibrationSet(ids, CalibrationInfo(**{**info.to_dict(), "note": "random tokens (model cannot generate)"}))
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InvalidInputError("--calib self needs a BOS or EOS token to start from; pass --calib FILE")
    eos = _eos_ids(model, tokenizer)
    # Autocast keeps its lower-precision copy of each weight that requires grad, for as long as
    # its context lasts: the decode loop then never reads the weights themselves again.
    casts_cached = (
        compute_dtype is not None and torch.is_autocast_cache_enabled() and all(p.requires_grad for p in model.parameters())
    )
    chunks = []
    with autocast_to(model, compute_dtype):
        for first in range(0, samples, GENERATION_BATCH):
            rows = min(GENERATION_BATCH, samples - first)
            part = f" ({first // GENERATION_BATCH + 1}/{-(-samples // GENERATION_BATCH)})" if samples > rows else ""
            chunks.append(_sample_from(model, start, rows, seq_len, generator, eos, part, casts_cached))
    ids = torch.cat(chunks)
    note = f"sampled from BOS: top_p={TOP_P}, temperature=1.0, end-of-text suppressed"
    return CalibrationSet(ids, CalibrationInfo(**{**info.to_dict(), "note": note}))


GENERATION_BATCH = 32  # sequences decoded together (the KV cache of 32×512 SmolLM2 tokens: ~0.4 GB)
TOP_P = 0.95


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return [i for i in ids if i is not None]


@torch.no_grad()  # not inference_mode: autocast caches its bfloat16 weight casts only outside it
def _sample_from(
    model, start: int, rows: int, seq_len: int, generator, eos: list[int], part: str, casts_cached: bool = False
) -> torch.Tensor:
    """``rows`` sequences of ``seq_len`` tokens: ``start``, then top-p samples with a KV cache.
    End-of-text tokens are never drawn, so that every window is text to its end. ``casts_cached``:
    autocast holds a copy of every weight, so the pages of the weights themselves (SmolLM2: 0.54 GB
    in float32) are released after the first step."""
    device = next(model.parameters()).device
    # transformers 5 renamed the KV cache argument and output from past_key_values to cache.
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = [torch.full((rows, 1), start, dtype=torch.long)]
    past = None
    for step in track(range(seq_len - 1), description=f"generating calibration text{part}"):
        out = model(input_ids=tokens[-1].to(device), use_cache=True, **{cache_name: past})
        past = out[cache_name]
        if casts_cached and step == 0:
            release(model.parameters())
        logits = out.logits[:, -1].float().cpu()
        if eos:
            logits[:, eos] = float("-inf")
        tokens.append(sample_top_p(logits, TOP_P, generator)[:, None])
    return torch.cat(tokens, dim=1)
