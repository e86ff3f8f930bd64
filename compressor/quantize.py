"""Round-to-nearest (RTN) weight quantization, written as a GPTQ checkpoint.

Per output row and group of ``group_size`` input columns, W ≈ s · (q − z) with integer codes q in
[0, 2^bits − 1]:

- symmetric: z = 2^(bits−1) and s = 2·max|w| / (2^bits − 1), GPTQ's own symmetric grid;
- asymmetric: the range [min(w, 0), max(w, 0)] spread over the 2^bits − 1 steps, z = round(−min/s).
  GPTQ v1 stores z − 1, so z is at least 1: a group whose z would round to 0 (no weight below
  −s/2) takes z = 1 and the scale that puts its maximum on the top code.

The scale is rounded to float16 (the format's dtype) upward, before the codes are computed, so the
grid covers the group and every weight's error is at most s/2 with the very scale the checkpoint
stores; the dequantized weight the model holds after :func:`quantize_rtn` is, bit for bit, what a
reader of the checkpoint computes. All-zero groups get s = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import NumericalError, UsageError, first_few
from compressor.formats.gptq_packing import WRITE_ALIGNMENT, QuantizedWeight, group_index, max_code, n_groups, packing_problem
from compressor.options import QuantizeOptions
from compressor.progress import track
from compressor.targets import Target


def _float16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 ≥ x, elementwise (x ≥ 0): a scale rounded up covers its whole range."""
    h = x.to(torch.float16)
    short = h.to(torch.float32) < x
    return torch.where(short, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _positive(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> QuantizedWeight:
    """Quantize one weight (out × in) to the nearest point of its per-group grid.

    ``group_size`` −1 (or ≥ in): one group per row; otherwise ⌈in / group_size⌉ groups, the last
    one partial where group_size does not divide in. Raises NumericalError when the weight holds
    NaN or Inf, or its scales overflow float16."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {list(weight.shape)}")
    out_features, in_features = weight.shape
    groups = n_groups(in_features, group_size)
    size = in_features if group_size == -1 else group_size
    maxq = max_code(bits)
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise NumericalError("the weight holds NaN or Inf")
    # Padding with zeros changes nothing: every group's range includes 0 anyway.
    wg = torch.nn.functional.pad(w, (0, groups * size - in_features)).view(out_features, groups, size)
    low = wg.amin(dim=-1).clamp(max=0)  # [out, groups]
    high = wg.amax(dim=-1).clamp(min=0)
    if sym:
        scale = _float16_at_least(_positive(2 * torch.maximum(-low, high) / maxq))
        zero = torch.full_like(low, float(1 << (bits - 1)))
    else:
        scale = _float16_at_least(_positive((high - low) / maxq))
        zero = torch.round(-low / scale.to(torch.float32))
        floor = zero < 1  # v1 cannot store z = 0
        if floor.any():
            scale = torch.where(floor, _float16_at_least(_positive(high / (maxq - 1))), scale)
            zero = torch.where(floor, torch.ones_like(zero), zero)
    if not torch.isfinite(scale).all():
        raise NumericalError("the weight's range overflows float16 scales")
    s = scale.to(torch.float32).unsqueeze(-1)
    codes = (torch.round(wg / s) + zero.unsqueeze(-1)).clamp_(0, maxq)
    codes = codes.view(out_features, groups * size)[:, :in_features].to(torch.uint8)
    return QuantizedWeight(
        codes=codes.contiguous(),
        zeros=zero.t().to(torch.int32).contiguous(),
        scales=scale.t().contiguous(),
        g_idx=group_index(in_features, group_size),
        bits=bits,
        group_size=group_size,
    )


def check_packable(targets: list[Target]) -> None:
    """UsageError naming every target a GPTQ checkpoint cannot hold, before any work."""
    problems = [p for t in targets if (p := packing_problem(t.name, *t.shape))]
    if problems:
        raise UsageError(
            f"{len(problems)} layers cannot be packed as GPTQ (in_features and out_features must be "
            f"multiples of {WRITE_ALIGNMENT}): {first_few(problems, 3)}"
        )


@dataclass
class QuantizeOutcome:
    options: QuantizeOptions
    quantized: dict[str, QuantizedWeight]  # module name → its codes, scales, zero points

    @property
    def modules(self) -> list[str]:
        return list(self.quantized)


def quantize_rtn(targets: list[Target], options: QuantizeOptions) -> QuantizeOutcome:
    """RTN-quantize every target in place: each weight becomes its dequantized self (in its own
    dtype), so the model computes what the checkpoint written from the outcome will.

    The targets must be packable (:func:`check_packable`); GPT-2's Conv1D weights are quantized
    as (out, in), as GPTQModel does, and written back transposed."""
    check_packable(targets)
    quantized: dict[str, QuantizedWeight] = {}
    for target in track(targets, description=f"quantizing to {options.bits} bits (rtn)"):
        try:
            q = rtn_quantize(target.weight(), options.bits, options.group_size, options.sym)
        except NumericalError as e:
            raise NumericalError(f"{target.name}: {e}") from e
        dense = q.dequantize()
        with torch.no_grad():
            target.module.weight.copy_(dense.t() if target.kind == "conv1d" else dense)
        quantized[target.name] = q
    return QuantizeOutcome(options, quantized)
