"""Corrections as a PEFT LoRA adapter folder, and adapters applied to a model.

Written: ``adapter_config.json`` (peft_type LORA, ``r``, ``lora_alpha`` = ``r`` so that PEFT's
scale alpha/r is 1, ``target_modules``, ``base_model_name_or_path``, bias "none"; with per-module
ranks also ``rank_pattern`` and ``alpha_pattern``) and ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` [r, in] and ``….lora_B.weight`` [out, r], float32.

Two forms. *Exact*: each module at its own rank (``rank_pattern`` where ranks differ); PEFT
loads it, serving engines do not (vLLM and SGLang read ``r`` and ``lora_alpha`` only, and vLLM
accepts only the ranks in ``SERVING_RANKS``). *Serving*: every module's factors zero-padded to
one allowed rank, no patterns; the product B·A, and so every logit, is unchanged.

Read: any PEFT LoRA adapter of plain linear targets (scales alpha/r or alpha/√r folded into B).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.errors import InvalidInputError, NumericalError, UsageError, first_few
from compressor.formats.atomic import atomic_dir, check_destination
from compressor.kernels import lowrank_linear
from compressor.targets import module_kind

SERVING_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class LowRankTerm:
    """B·A added to a module's output: B [out, r], A [r, in]."""

    b: torch.Tensor
    a: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])


@dataclass
class Adapter:
    terms: dict[str, LowRankTerm]  # module name → its correction, scale folded in
    base_model: str | None
    fan_in_fan_out: bool = False


def serving_rank(ranks: list[int]) -> int:
    """The smallest rank every serving engine accepts that holds all of ``ranks``."""
    top = max(ranks, default=0)
    for r in SERVING_RANKS:
        if r >= top:
            return r
    raise UsageError(f"rank {top} exceeds the largest rank serving engines accept ({SERVING_RANKS[-1]}); use the exact form")


def _short_names(names: list[str], model_names: list[str] | None) -> list[str]:
    """PEFT's target_modules: the last name component (q_proj, …) where those cover exactly the
    corrected modules of the model, else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    if model_names is None:
        return sorted(names)
    covered = {n for n in model_names if n.rsplit(".", 1)[-1] in short}
    return short if covered == set(names) else sorted(names)


def save_adapter(
    folder: str | Path,
    terms: dict[str, LowRankTerm],
    *,
    base_model: str | None,
    serve_form: bool | None = None,
    fan_in_fan_out: bool = False,
    model_linear_names: list[str] | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``terms`` as a PEFT LoRA folder (atomically). ``serve_form``: see the module doc; None
    means the serving form when every rank is the same, the exact form otherwise.
    ``model_linear_names``: every linear module name of the base, to write short target names."""
    from safetensors.torch import save_file

    dest = check_destination(folder, overwrite)
    if not terms:
        raise UsageError("no corrections to write: every module got rank 0")
    ranks = {name: t.rank for name, t in terms.items()}
    uniform = len(set(ranks.values())) == 1
    serve = uniform if serve_form is None else serve_form
    tensors: dict[str, torch.Tensor] = {}
    if serve:
        r = serving_rank(list(ranks.values()))
        rank_pattern: dict[str, int] = {}
    else:
        r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
        rank_pattern = {name: k for name, k in ranks.items() if k != r}
    for name, term in terms.items():
        b, a = term.b.detach().to("cpu", torch.float32), term.a.detach().to("cpu", torch.float32)
        if serve and term.rank < r:
            a = torch.cat([a, a.new_zeros(r - term.rank, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], r - term.rank)], dim=1)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": _short_names(list(terms), model_linear_names),
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),  # alpha = rank: scale 1 for each module
        "modules_to_save": None,
    }
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if metadata:
            (tmp / "compress.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return dest


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rule: a pattern key applies to the module whose name it ends (as a regex)."""
    for key, value in pattern.items():
        try:
            if key == name or re.fullmatch(rf"(.*\.)?(?:{key})", name):
                return value
        except re.error as e:
            raise InvalidInputError(f"adapter pattern {key!r} is not a valid regular expression: {e}") from e
    return default


def read_adapter(folder: str | Path) -> Adapter:
    """A PEFT LoRA folder → its terms with the scale folded into B. Refuses what it cannot
    apply exactly (other PEFT types, DoRA, missing or mis-shaped factors) as invalid input."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from compressor.formats.safetensors_header import read_safetensors_header

    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"adapter folder not found: {folder}")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"{folder} has no {CONFIG}: not a PEFT adapter folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"cannot read {folder / CONFIG}: {e}") from e
    if not isinstance(config, dict):
        raise InvalidInputError(f"{folder / CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise InvalidInputError(f"{folder}: only LoRA adapters can be applied (peft_type {config.get('peft_type')!r})")
    if config.get("use_dora"):
        raise InvalidInputError(f"{folder}: DoRA adapters are not supported")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise InvalidInputError(f"{folder} has no {WEIGHTS}")
    try:
        read_safetensors_header(weights)  # a corrupt file is refused, naming each problem, before it is read
    except InvalidInputError as e:
        raise InvalidInputError(f"cannot read the adapter: {e}") from e
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as e:
        raise InvalidInputError(f"cannot read {weights}: {e}") from e
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    strange, names = [], set()
    for key, value in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(\.[^.]+)?\.weight", key)
        if match is None:
            strange.append(key)
            continue
        names.add(match.group(3))
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    if strange:
        raise InvalidInputError(f"{weights}: tensors that are not LoRA factors: {first_few(strange)}")
    if len(names) > 1:
        raise InvalidInputError(f"{weights} holds several adapters ({', '.join(sorted(n or '(unnamed)' for n in names))}); save one")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NumericalError(f"{weights}: {first_few(bad)} hold NaN or Inf")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    terms: dict[str, LowRankTerm] = {}
    broken = []
    for name, pair in pairs.items():
        a, b = pair.get("A"), pair.get("B")
        rank = _pattern_value(rank_pattern, name, r)
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            broken.append(name)
            continue
        module_alpha = _pattern_value(alpha_pattern, name, alpha)
        scale = module_alpha / math.sqrt(rank) if config.get("use_rslora") else module_alpha / rank
        terms[name] = LowRankTerm(b.to(torch.float32) * scale, a.to(torch.float32))
    if broken:
        raise InvalidInputError(f"{weights}: missing factors or ranks unlike the config for {first_few(broken)}")
    return Adapter(terms, config.get("base_model_name_or_path"), bool(config.get("fan_in_fan_out", False)))


def _module_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a module an adapter may target, None for any other."""
    kind = module_kind(module, factored=True)
    if kind is None:
        return None
    if kind == "factored":
        return (module.out_features, module.in_features)
    w = module.weight
    return (w.shape[1], w.shape[0]) if kind == "conv1d" else tuple(w.shape)


def check_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Every term names a linear module of ``model`` of the term's shape; else invalid input, all
    problems in one message, before anything is changed."""
    modules = dict(model.named_modules())
    missing, mismatched = [], []
    for name, term in adapter.terms.items():
        module = modules.get(name)
        shape = None if module is None else _module_shape(module)
        if shape is None:
            missing.append(name)
        elif shape != term.shape:
            mismatched.append(f"{name} {term.shape} vs {shape}")
    problems = []
    if missing:
        problems.append(f"no linear module {first_few(missing)} in the model")
    if mismatched:
        problems.append(f"shapes (out, in) differ, adapter vs model: {first_few(mismatched)}")
    if problems:
        raise InvalidInputError("the adapter does not fit the model: " + "; ".join(problems))


@torch.no_grad()
def apply_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Add each term to its module: merged into the weight of a Linear or Conv1D (W += B·A, in the
    weight's dtype), a forward hook on a factored module or on a weight that another module shares
    (a tied LM head: merging would change the embeddings too). Checked whole first."""
    check_adapter(model, adapter)
    shared = _shared_weights(model)
    for name, term in adapter.terms.items():
        module = model.get_submodule(name)
        kind = module_kind(module, factored=True)
        if kind == "factored" or id(module.weight) in shared:
            module.register_forward_hook(adding_hook(term))
            continue
        delta = term.b.to(torch.float64) @ term.a.to(torch.float64)
        delta = delta.T if kind == "conv1d" else delta  # Conv1D stores (in, out)
        module.weight += delta.to(module.weight.device, module.weight.dtype)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def adding_hook(term: LowRankTerm):
    """A forward hook adding x·Aᵀ·Bᵀ to a module's output (the factors moved to the input's
    device once, on the first call there)."""
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, output):
        x = args[0]
        if x.device not in on_device:
            on_device[x.device] = (term.a.to(x.device), term.b.to(x.device))
        a, b = on_device[x.device]
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts by itself
            x = x.to(a.dtype)
        return output + lowrank_linear(x, a, b).to(output.dtype)

    return hook


@contextlib.contextmanager
def terms_applied(model: nn.Module, terms: dict[str, LowRankTerm]) -> Iterator[None]:
    """``terms`` added to their modules' outputs by forward hooks, removed on exit."""
    handles = [model.get_submodule(name).register_forward_hook(adding_hook(t)) for name, t in terms.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
