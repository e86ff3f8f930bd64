"""The factored checkpoint: selected linear layers W (out×in) stored as B (out×r) · A (r×in).

On disk it is an ordinary Hugging Face model folder. ``config.json`` carries

    "quantization_config": {"quant_method": "compress_lowrank", "format_version": 1,
                            "method": ..., "target": ..., "calibration": {...},
                            "ranks": {"model.layers.0.self_attn.q_proj": 8, ...}}

and a factored module ``m`` stores ``m.weight_a`` [r, in], ``m.weight_b`` [out, r] (and ``m.bias``)
instead of ``m.weight``. Importing this module registers a transformers quantization config and
quantizer for ``compress_lowrank``, so that stock ``from_pretrained`` swaps the recorded modules for
:class:`FactoredLinear` on the meta device before the weights load. No remote code is involved.

This module is the format in memory (the module, the conversion, the registration); the folder on
disk (writing, validation from the safetensors headers, strict loading) is
:mod:`compressor.formats.checkpoint`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from compressor.errors import first_few
from compressor.kernels import lowrank_linear

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANT_METHOD = "compress_lowrank"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})



# --------------------------------------------------------------------------------------------
# The module


class FactoredLinear(nn.Module):
    """y = (x·Aᵀ)·Bᵀ + bias, with A = ``weight_a`` [rank, in] and B = ``weight_b`` [out, rank].

    It stands in for an ``nn.Linear`` or a GPT-2 ``Conv1D``; both are held in (out, in)
    orientation. ``transposed_origin`` records a Conv1D origin so that :func:`export_dense`
    can restore a Conv1D, whose weight the original architecture's checkpoints store as (in, out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        transposed_origin: bool = False,
    ) -> None:
        super().__init__()
        if min(in_features, out_features) <= 0 or rank < 0:
            raise ValueError(f"invalid FactoredLinear shape: in={in_features}, out={out_features}, rank={rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.transposed_origin = transposed_origin
        factory = {"dtype": dtype, "device": device}
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for each factor (only a fresh, unloaded module uses it)."""
        if self.rank > 0:  # torch warns about initialising empty tensors
            nn.init.kaiming_uniform_(self.weight_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.weight_b, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_factors(
        cls,
        b: torch.Tensor,
        a: torch.Tensor,
        bias: torch.Tensor | None = None,
        transposed_origin: bool = False,
    ) -> FactoredLinear:
        """A module holding copies of B [out, r], A [r, in] and the bias [out] (dtype/device of B)."""
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"factors do not chain: B {tuple(b.shape)} · A {tuple(a.shape)}")
        out_features, rank = b.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} for {out_features} outputs")
        module = cls(
            a.shape[1], out_features, rank, bias is not None, device="meta", transposed_origin=transposed_origin
        )
        dtype, device = b.dtype, b.device
        module.weight_a = nn.Parameter(_owned_copy(a, dtype, device))
        module.weight_b = nn.Parameter(_owned_copy(b, dtype, device))
        if bias is not None:
            module.bias = nn.Parameter(_owned_copy(bias, dtype, device))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, self.weight_a, self.weight_b, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """B·A as (out, in), multiplied in at least float32 and returned in the factors' dtype."""
        compute = torch.promote_types(self.weight_b.dtype, torch.float32)
        return (self.weight_b.to(compute) @ self.weight_a.to(compute)).to(self.weight_b.dtype)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The equivalent dense layer: a Conv1D (weight (in, out)) for a Conv1D origin, else nn.Linear."""
        weight = self.dense_weight()
        if self.transposed_origin:
            with torch.device("meta"):
                dense: nn.Module = Conv1D(self.out_features, self.in_features)
            dense.weight = nn.Parameter(weight.t().contiguous())
            if self.bias is not None:
                dense.bias = nn.Parameter(self.bias.detach().clone())
            else:  # Conv1D always has a bias
                dense.bias = nn.Parameter(torch.zeros(self.out_features, dtype=weight.dtype, device=weight.device))
            return dense
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone())
        return dense

    def extra_repr(self) -> str:
        origin = ", transposed_origin=True" if self.transposed_origin else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}{origin}"
        )


def _owned_copy(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous tensor with its own storage: a slice of a larger SVD result must not keep the
    whole matrix alive, and safetensors refuses tensors that share storage."""
    return t.detach().to(device=device, dtype=dtype).clone(memory_format=torch.contiguous_format)


def _linear_geometry(name: str, module: nn.Module) -> tuple[int, int, bool]:
    """(out, in, is_conv1d) of a replaceable layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return out_features, in_features, True
    raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear or Conv1D that can be factored")


def factored_modules(model: nn.Module) -> dict[str, FactoredLinear]:
    """Every FactoredLinear of the model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactoredLinear)}


# --------------------------------------------------------------------------------------------
# In-memory conversion


def _tied_parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Parameters reachable under more than one name (tied), by id."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def apply_factors(
    model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None = None
) -> None:
    """Replace each named nn.Linear / Conv1D by a FactoredLinear holding (B [out, r], A [r, in]).

    Factors are cast to ``dtype`` (default: the replaced weight's) on the weight's device; the bias
    is kept (cast to ``dtype`` where it differs). Everything is
    checked before the first module changes, so an error leaves the model untouched. A weight tied
    to another parameter (e.g. an LM head tied to the embeddings) is refused: factoring it would
    silently untie the two.
    """
    tied = _tied_parameter_names(model)
    replacements: dict[str, FactoredLinear] = {}
    for name, (b, a) in factors.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"{type(model).__name__} has no module named {name!r}") from None
        out_features, in_features, conv1d = _linear_geometry(name, old)
        if b.dim() != 2 or a.dim() != 2 or b.shape[0] != out_features or a.shape[1] != in_features or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"factors for {name} ({out_features}×{in_features}) have shapes B {tuple(b.shape)}, A {tuple(a.shape)}; "
                "expected B (out, r) and A (r, in)"
            )
        if id(old.weight) in tied:
            others = [n for n in tied[id(old.weight)] if n != f"{name}.weight"]
            raise ValueError(f"{name}.weight is tied to {', '.join(others)}; a tied weight cannot be factored")
        w = old.weight
        new = FactoredLinear.from_factors(b.to(dtype=dtype or w.dtype, device=w.device), a, transposed_origin=conv1d)
        if old.bias is not None:
            if dtype is None or old.bias.dtype == dtype:
                new.bias = old.bias  # the very same parameter, untouched
            else:
                new.bias = nn.Parameter(old.bias.detach().to(dtype), requires_grad=old.bias.requires_grad)
        new.train(old.training)
        replacements[name] = new
    for name, new in replacements.items():
        model.set_submodule(name, new)


def export_dense(model: nn.Module) -> None:
    """Replace every FactoredLinear by its dense equivalent and drop the factored-format markers.

    A Conv1D origin becomes a Conv1D again (weight (B·A)ᵀ), so a plain ``save_pretrained`` then
    writes a standard checkpoint of the original architecture that any tool loads.
    """
    for name, module in list(factored_modules(model).items()):
        dense = module.to_dense()
        dense.train(module.training)
        model.set_submodule(name, dense)
    _strip_quantization_markers(model)


def _strip_quantization_markers(model: nn.Module) -> None:
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            config = module.config
            for attr in ("quantization_config", "_is_quantized"):
                if hasattr(config, attr):
                    delattr(config, attr)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if "is_quantized" in vars(model):
        model.is_quantized = False


# --------------------------------------------------------------------------------------------
# Registration with transformers


class LowRankConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a factored checkpoint.

    ``method``, ``target`` and ``calibration`` are free metadata of the compression run; any
    further keys are kept and written back. Constructing one with an unknown ``format_version``
    raises, which is how stock ``from_pretrained`` refuses a newer checkpoint.
    """

    def __init__(
        self,
        ranks: Mapping[str, int] | None = None,
        format_version: int = FORMAT_VERSION,
        method: Any = None,
        target: Any = None,
        calibration: Any = None,
        quant_method: str = QUANT_METHOD,
        **extra: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LowRankConfig got quant_method {quant_method!r}, expected {QUANT_METHOD!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.method = method
        self.target = target
        self.calibration = {} if calibration is None else calibration
        self.ranks = dict(ranks or {})
        self.extra = dict(extra)
        self.post_init()

    def post_init(self) -> None:
        check_format_version(self.format_version)
        for name, rank in self.ranks.items():
            if not isinstance(name, str) or isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise ValueError(f"{QUANT_METHOD}: invalid rank entry {name!r}: {rank!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "method": self.method,
            "target": self.target,
            "calibration": json.loads(json.dumps(self.calibration)),
            "ranks": dict(self.ranks),
            **json.loads(json.dumps(self.extra)),
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        yield from self.to_dict().items()


def check_format_version(version: Any) -> None:
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_FORMAT_VERSIONS))
        raise ValueError(
            f"{QUANT_METHOD} checkpoint has format_version {version!r}, which this version of compressor "
            f"cannot read (it reads {supported}); upgrade compressor"
        )


class LowRankQuantizer(HfQuantizer):
    """Builds FactoredLinear modules at the recorded ranks before transformers loads the weights.

    The factors are ordinary floating-point parameters, so nothing is converted while loading:
    ``param_needs_quantization`` stays False and the loader copies ``weight_a``/``weight_b`` as it
    would any weight.
    """

    # Factors come from a compression run: asking transformers to "quantize" a dense model on the
    # fly with this config is refused by HfQuantizer.__init__.
    requires_calibration = True
    quantization_config: LowRankConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_format_version(self.quantization_config.format_version)

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        replace_with_factored(model, self.quantization_config.ranks)
        _skip_parent_reinit(model)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        # Stock from_pretrained only logs missing keys and leaves their memory uninitialised: for a
        # factor that is never acceptable. Loaded tensors carry `_is_hf_initialized`.
        missing = [
            f"{name}.{pname}"
            for name, module in factored_modules(model).items()
            for pname, p in module.named_parameters(recurse=False)
            if p.device.type != "meta" and p.numel() > 0 and not getattr(p, "_is_hf_initialized", False)
        ]
        if missing:
            raise ValueError(f"{QUANT_METHOD} checkpoint lacks factor tensors: {first_few(missing)}")

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[None, dict[str, str]]:
        # save_pretrained calls this before writing config.json: refresh the ranks so that a model
        # whose modules changed after loading is described truthfully.
        self.quantization_config.ranks = {name: m.rank for name, m in factored_modules(model).items()}
        return None, {}

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        for name, module in list(factored_modules(model).items()):
            dense = module.to_dense()
            if dtype is not None:
                dense.to(dtype)
            model.set_submodule(name, dense)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def replace_with_factored(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Swap each named layer for an (uninitialised-value) FactoredLinear of that rank, on the
    layer's own device and dtype: the meta device while transformers builds the skeleton."""
    names = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = set()
    for source, target in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.update((source, target))
    for recorded, rank in ranks.items():
        name = resolve_module_name(recorded, names, prefix)
        if f"{name}.weight" in tied:
            raise ValueError(f"{QUANT_METHOD}: {name}.weight is tied to another weight and cannot be factored")
        old = model.get_submodule(name)
        out_features, in_features, conv1d = _linear_geometry(name, old)
        new = FactoredLinear(
            in_features,
            out_features,
            rank,
            bias=old.bias is not None,
            dtype=old.weight.dtype,
            device=old.weight.device,
            transposed_origin=conv1d,
        )
        model.set_submodule(name, new)


def _skip_parent_reinit(model: nn.Module) -> None:
    """Keep transformers' weight initialisation away from the containers of FactoredLinear.

    After loading, transformers runs each model's ``_init_weights`` on every module, and some
    reach into a child's ``.weight`` (GPT-2 rescales ``attn.c_proj.weight``), which a factored
    layer does not have. Marking a container initialised skips only its own ``_init_weights`` call;
    its children, FactoredLinear included, are still visited. Containers holding parameters or
    buffers of their own, and sub-models, are left alone so that nothing of theirs goes uninitialised.
    """
    from transformers import PreTrainedModel

    factored = set(factored_modules(model))
    for name, module in model.named_modules():
        if isinstance(module, (FactoredLinear, PreTrainedModel)):
            continue
        if not any(f.startswith(f"{name}.") for f in factored):
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            module._is_hf_initialized = True


def resolve_module_name(recorded: str, names: set[str], prefix: str) -> str:
    """The recorded name, allowing for a head model's checkpoint loaded as its base model and
    vice versa (``model.layers.0…`` versus ``layers.0…``)."""
    candidates = [recorded]
    if prefix:
        candidates += [recorded.removeprefix(f"{prefix}."), f"{prefix}.{recorded}"]
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise ValueError(f"{QUANT_METHOD} checkpoint factors {recorded!r}, which this model does not have")


def _register() -> None:
    """Register once; tolerate a reload of this module (same qualified class name)."""
    for mapping, cls, register in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, LowRankConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, LowRankQuantizer, register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is None:
            register(QUANT_METHOD)(cls)
        elif existing is not cls:
            if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
                raise RuntimeError(f"transformers already has {existing.__qualname__} registered for {QUANT_METHOD!r}")
            mapping[QUANT_METHOD] = cls


_register()
