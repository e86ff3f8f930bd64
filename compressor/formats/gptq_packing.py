"""GPTQ's packed integer tensors in plain torch: bit packing, and the dequantization it encodes.

The layout is auto-gptq's and GPTQModel's ``checkpoint_format`` "gptq" (v1), read here without
either package. A quantized weight W (out × in) split into groups of ``group_size`` input columns is
four tensors:

- ``qweight`` int32 [in·bits/32, out]: column o holds the codes q[o, 0], q[o, 1], … q[o, in−1] as
  one little-endian bit stream: code i takes stream bits [i·bits, (i+1)·bits), word k of the column
  holds stream bits [32k, 32k+32), least significant bit first. For 2, 4 and 8 bits a word holds
  32/bits whole codes (code i in word i·bits // 32 at shift i·bits % 32); for 3 bits 32 codes fill
  three words and two codes cross a word boundary: code 10 takes bits 30–31 of the first word and
  bit 0 of the second, code 21 bit 31 of the second and bits 0–1 of the third (GPTQModel's
  10 | 1 | 10 | 1 | 10 pattern is exactly this stream).
- ``qzeros`` int32 [n_groups, out·bits/32]: each group's zero points along the output dimension,
  packed in the same stream order. v1 ("gptq") stores zero − 1, so a zero point must be at least 1;
  v2 ("gptq_v2", read only) stores the zero point itself.
- ``scales`` float16 [n_groups, out].
- ``g_idx`` int32 [in]: the group of each input column, i // group_size (desc_act false).

W[o, i] = scales[g, o] · (q[o, i] − zero[g, o]) with g = g_idx[i]. n_groups = ⌈in / group_size⌉:
where group_size does not divide ``in`` the last group is partial (SmolLM2: 576 columns in groups of
128 make four whole groups and one of 64), and ``g_idx`` says so; group_size −1 is one group per
row. Packing needs whole words: a dimension of n codes packs when n·bits is a multiple of 32;
a layer is written only when both its dimensions are multiples of 32 (:func:`packing_problem`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)
WORD_BITS = 32
_MASK32 = (1 << WORD_BITS) - 1
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# What each checkpoint_format stores in qzeros: the zero point minus this.
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
# A layer is written only when in_features and out_features are multiples of this, whatever the
# bits: GPTQModel's packer requires it (and sizes qzeros as out // 32 · bits words), so whatever
# is written here, GPTQModel could have written, and its readers accept.
WRITE_ALIGNMENT = 32


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"GPTQ packing supports {', '.join(map(str, BITS))} bits, not {bits}")


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def n_groups(in_features: int, group_size: int) -> int:
    """⌈in / group_size⌉; group_size −1 (or ≥ in) is one group."""
    if group_size == -1:
        return 1
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1 or -1, got {group_size}")
    return math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx``: the group of each input column, i // group_size, as int32 [in]."""
    size = in_features if group_size == -1 else group_size
    n_groups(in_features, group_size)  # validates group_size
    return torch.div(torch.arange(in_features, dtype=torch.int32), size, rounding_mode="floor")


def packing_problem(name: str, out_features: int, in_features: int) -> str | None:
    """Why a layer (out × in) cannot be written as GPTQ (:data:`WRITE_ALIGNMENT`), or None when it can."""
    bad = [f"{what} {n}" for what, n in (("in_features", in_features), ("out_features", out_features)) if n % WRITE_ALIGNMENT]
    if not bad:
        return None
    return f"{name} ({out_features}×{in_features}): {' and '.join(bad)} not a multiple of {WRITE_ALIGNMENT}"


def zero_offset(checkpoint_format: str) -> int:
    try:
        return ZERO_OFFSETS[checkpoint_format]
    except KeyError:
        raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}; known: {', '.join(ZERO_OFFSETS)}") from None


# --------------------------------------------------------------------------------------------
# The bit stream along dimension 0


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 → int32 of the same bits (two's complement)."""
    words = words & _MASK32
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [n, cols] in [0, 2^bits) → int32 [n·bits/32, cols], each column one bit stream.

    Raises ValueError when n·bits is not a multiple of 32 or a code is out of range."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {list(codes.shape)}")
    n, cols = codes.shape
    if n * bits % WORD_BITS:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > max_code(bits)):
        raise ValueError(f"codes must lie in [0, {max_code(bits)}] for {bits} bits")
    blocks = -(-n // WORD_BITS)  # 32 codes make `bits` whole words, for every width
    c = torch.nn.functional.pad(c, (0, 0, 0, blocks * WORD_BITS - n)).view(blocks, WORD_BITS, cols)
    words = torch.zeros(blocks, bits, cols, dtype=torch.int64)
    for j in range(WORD_BITS):
        word, shift = divmod(j * bits, WORD_BITS)
        words[:, word] |= (c[:, j] << shift) & _MASK32
        if shift + bits > WORD_BITS:  # 3 bits: the high bits go to the next word
            words[:, word + 1] |= c[:, j] >> (WORD_BITS - shift)
    return _to_int32(words.view(blocks * bits, cols)[: n * bits // WORD_BITS])


def unpack_rows(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """int32 [words, cols] → codes int32 [n, cols], the inverse of :func:`pack_rows`.

    ``n`` defaults to every code the words hold (words·32/bits)."""
    check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"packed words must be 2-D, got shape {list(packed.shape)}")
    rows, cols = packed.shape
    full = rows * WORD_BITS // bits
    n = full if n is None else n
    if n < 0 or -(-n * bits // WORD_BITS) != rows:
        raise ValueError(f"{rows} words of 32 bits do not hold exactly {n} codes of {bits} bits")
    blocks = -(-rows // bits)
    w = packed.to(torch.int64) & _MASK32
    w = torch.nn.functional.pad(w, (0, 0, 0, blocks * bits - rows)).view(blocks, bits, cols)
    codes = torch.empty(blocks, WORD_BITS, cols, dtype=torch.int64)
    for j in range(WORD_BITS):
        word, shift = divmod(j * bits, WORD_BITS)
        value = w[:, word] >> shift
        if shift + bits > WORD_BITS:
            value = value | (w[:, word + 1] << (WORD_BITS - shift))
        codes[:, j] = value & max_code(bits)
    return codes.view(blocks * WORD_BITS, cols)[:n].to(torch.int32)


# --------------------------------------------------------------------------------------------
# The two layouts


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [out, in] → ``qweight`` int32 [in·bits/32, out] (packed along the input dimension)."""
    return pack_rows(codes.t(), bits).contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int | None = None) -> torch.Tensor:
    """``qweight`` [in·bits/32, out] → codes int32 [out, in]."""
    return unpack_rows(qweight, bits, in_features).t().contiguous()


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Zero points [n_groups, out] → ``qzeros`` int32 [n_groups, out·bits/32] (packed along the
    output dimension). v1 ("gptq") stores zero − 1: a zero point of 0 cannot be written there."""
    offset = zero_offset(checkpoint_format)
    stored = zeros.to(torch.int64) - offset
    if stored.numel() and int(stored.min()) < 0:
        raise ValueError(f"checkpoint_format {checkpoint_format!r} cannot store a zero point below {offset}")
    return pack_rows(stored.t(), bits).t().contiguous()


def unpack_qzeros(
    qzeros: torch.Tensor, bits: int, out_features: int | None = None, checkpoint_format: str = "gptq"
) -> torch.Tensor:
    """``qzeros`` [n_groups, out·bits/32] → zero points int32 [n_groups, out] (v1: stored + 1)."""
    offset = zero_offset(checkpoint_format)
    return (unpack_rows(qzeros.t(), bits, out_features).t() + offset).contiguous()


# --------------------------------------------------------------------------------------------
# Dequantization


def dequantize_codes(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W [out, in] float32 = scales[g, o] · (codes[o, i] − zeros[g, o]), g = g_idx[i].

    One rounding (the product, in float32): the float16 scales and the integer differences are
    exact in float32, so the same inputs give the same bits wherever this runs."""
    index = g_idx.to(torch.long)
    s = scales.to(torch.float32)[index].t()  # [out, in]
    z = zeros.to(torch.float32)[index].t()
    return s * (codes.to(torch.float32) - z)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    *,
    checkpoint_format: str = "gptq",
) -> torch.Tensor:
    """The dense weight [out, in] (float32) that a GPTQ module's four tensors encode."""
    out_features, in_features = scales.shape[1], g_idx.shape[0]
    codes = unpack_qweight(qweight, bits, in_features)
    zeros = unpack_qzeros(qzeros, bits, out_features, checkpoint_format)
    return dequantize_codes(codes, zeros, scales, g_idx)


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight, unpacked: W ≈ scales[g] · (codes − zeros[g]) per input group g.

    What a quantizer produces and :func:`compressor.formats.gptq.save_gptq` packs; ``dequantize``
    gives exactly the weight a reader of the written checkpoint computes."""

    codes: torch.Tensor  # uint8 [out, in], in [0, 2^bits)
    zeros: torch.Tensor  # int32 [n_groups, out], the zero points themselves (not minus 1)
    scales: torch.Tensor  # float16 [n_groups, out]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # as given: -1 for one group per row

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in)"""
        return (self.codes.shape[0], self.codes.shape[1])

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.zeros, self.scales, self.g_idx)

    def packed(self, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
        """The checkpoint tensors, by suffix: qweight, qzeros, scales, g_idx."""
        return {
            "qweight": pack_qweight(self.codes, self.bits),
            "qzeros": pack_qzeros(self.zeros, self.bits, checkpoint_format),
            "scales": self.scales.to(torch.float16).contiguous(),
            "g_idx": self.g_idx.to(torch.int32).contiguous(),
        }

    @classmethod
    def unpack(
        cls, tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, checkpoint_format: str = "gptq"
    ) -> QuantizedWeight:
        """From the checkpoint tensors by suffix (shapes already checked by the caller)."""
        scales, g_idx = tensors["scales"], tensors["g_idx"]
        codes = unpack_qweight(tensors["qweight"], bits, g_idx.shape[0]).to(torch.uint8)
        zeros = unpack_qzeros(tensors["qzeros"], bits, scales.shape[1], checkpoint_format)
        return cls(codes, zeros, scales.to(torch.float16), g_idx.to(torch.int32), bits, group_size)
