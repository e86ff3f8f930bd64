"""GPTQ packing in plain torch: bit streams, the qweight/qzeros layouts against GPTQModel's own
output, dequantization by groups (partial last group, one group per row)."""

from __future__ import annotations

import pytest
import torch

from compressor.formats.gptq_packing import (
    BITS,
    QuantizedWeight,
    dequantize,
    dequantize_codes,
    group_index,
    n_groups,
    pack_qweight,
    pack_qzeros,
    pack_rows,
    unpack_qweight,
    unpack_qzeros,
    unpack_rows,
)

# GPTQModel 7.6's TorchLinear.pack_block on a 32 (out) × 64 (in) layer, group size 32, codes
# q[o, i] = (5i + 3o) mod 2^bits and zero points z[g, o] = (7g + 5o) mod 2^bits (packed as they
# are: GPTQModel subtracts the v1 offset only when it saves): qweight[:, :2] and qzeros[0].
GPTQMODEL_QWEIGHT = {
    2: [[-454761244, -1819044973]] * 4,
    3: [[-1468477784, 1137079619], [-827819826, 1967375989], [2026809464, -965393466]] * 2,
    4: [[1049950800, 1640443267], [-1239649576, -380656373]] * 4,
    8: [
        [252314880, 302843907], [589175060, 639704087], [926035240, 976564267], [1262895420, 1313424447],
        [1599755600, 1650284627], [1936615780, 1987144807], [-2021491336, -1970962309], [-1684631156, -1634102129],
        [-1347770976, -1297241949], [-1010910796, -960381769], [-674050616, -623521589], [-337190436, -286661409],
        [-330256, 50198771], [319686916, 370215943], [656547096, 707076123], [993407276, 1043936303],
    ],
}
GPTQMODEL_QZEROS_ROW0 = {
    2: [-454761244, -454761244],
    3: [-1468477784, -827819826, 2026809464],
    4: [1049950800, -1239649576, 1049950800, -1239649576],
    8: [252314880, 589175060, 926035240, 1262895420, 1599755600, 1936615780, -2021491336, -1684631156],
}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [32, 96, 256])
def test_pack_unpack_rows_bit_exact(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n, 7), generator=gen, dtype=torch.int32)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (n * bits // 32, 7)
    assert torch.equal(unpack_rows(packed, bits), codes)


@pytest.mark.parametrize("bits, n", [(4, 40), (2, 48), (8, 12)])
def test_whole_words_short_of_a_block(bits, n):
    """2, 4 and 8 bits pack any n that fills whole words, not only multiples of 32."""
    codes = torch.randint(0, 2**bits, (n, 3), dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(codes, bits), bits, n), codes)


def test_bit_order_is_a_little_endian_stream():
    four = pack_rows(torch.arange(8).view(8, 1), 4)
    assert four.tolist() == [[0x76543210]]
    three = torch.zeros(32, 1, dtype=torch.int32)
    three[10] = 0b111  # bits 30..32: the top of word 0 and bit 0 of word 1
    three[21] = 0b101  # bits 63..65: bit 31 of word 1 and bits 0..1 of word 2
    words = pack_rows(three, 3).view(-1).tolist()
    assert [w & 0xFFFFFFFF for w in words] == [0xC0000000, 0x80000001, 0b10]


@pytest.mark.parametrize("bits", BITS)
def test_layouts_match_gptqmodel(bits):
    out_features, in_features = 32, 64
    q = (torch.arange(in_features).view(1, -1) * 5 + torch.arange(out_features).view(-1, 1) * 3) % 2**bits
    z = (torch.arange(2).view(-1, 1) * 7 + torch.arange(out_features).view(1, -1) * 5) % 2**bits
    qweight = pack_qweight(q, bits)
    assert qweight.shape == (in_features * bits // 32, out_features)
    assert qweight[:, :2].tolist() == GPTQMODEL_QWEIGHT[bits]
    qzeros = pack_qzeros(z, bits, checkpoint_format="gptq_v2")
    assert qzeros.shape == (2, out_features * bits // 32)
    assert qzeros[0].tolist() == GPTQMODEL_QZEROS_ROW0[bits]
    assert torch.equal(unpack_qweight(qweight, bits), q.to(torch.int32))
    assert torch.equal(unpack_qzeros(qzeros, bits, checkpoint_format="gptq_v2"), z.to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
def test_v1_stores_zero_minus_one(bits):
    z = torch.randint(1, 2**bits, (3, 64), dtype=torch.int32)
    v1 = pack_qzeros(z, bits)
    assert torch.equal(v1, pack_qzeros(z - 1, bits, checkpoint_format="gptq_v2"))
    assert torch.equal(unpack_qzeros(v1, bits), z)
    with pytest.raises(ValueError, match="zero point below 1"):
        pack_qzeros(torch.zeros(1, 32, dtype=torch.int32), bits)


def test_pack_refusals():
    with pytest.raises(ValueError, match="whole 32-bit words"):
        pack_rows(torch.zeros(31, 1, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_rows(torch.zeros(32, 1), 5)
    with pytest.raises(ValueError, match="exactly"):
        unpack_rows(torch.zeros(3, 1, dtype=torch.int32), 4, 40)


def _reference(q, z, s, group_size):
    """scale · (q − zero), group by group, written out the slow way."""
    out_features, in_features = q.shape
    size = in_features if group_size == -1 else group_size
    w = torch.empty(out_features, in_features)
    for g, start in enumerate(range(0, in_features, size)):
        cols = slice(start, min(start + size, in_features))
        w[:, cols] = s[g].float().view(-1, 1) * (q[:, cols].float() - z[g].float().view(-1, 1))
    return w


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, groups", [(40, 3), (32, 3), (-1, 1), (128, 1)])
def test_dequantize_by_groups(bits, group_size, groups):
    out_features, in_features = 32, 96  # group 40: 40 + 40 + 16, a partial last group
    assert n_groups(in_features, group_size) == groups
    g_idx = group_index(in_features, group_size)
    assert g_idx.dtype == torch.int32 and g_idx.tolist() == [i // (group_size if group_size > 0 else 96) for i in range(96)]
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (out_features, in_features), generator=gen)
    z = torch.randint(1, 2**bits, (groups, out_features), generator=gen)
    s = (torch.rand(groups, out_features, generator=gen) + 0.01).half()
    expected = _reference(q, z, s, group_size)
    assert torch.equal(dequantize_codes(q, z, s, g_idx), expected)
    weight = dequantize(pack_qweight(q, bits), pack_qzeros(z, bits), s, g_idx, bits)
    assert weight.dtype == torch.float32 and torch.equal(weight, expected)
    packed = QuantizedWeight(q.to(torch.uint8), z.to(torch.int32), s, g_idx, bits, group_size).packed()
    assert set(packed) == {"qweight", "qzeros", "scales", "g_idx"}
    back = QuantizedWeight.unpack(packed, bits, group_size)
    assert torch.equal(back.dequantize(), expected)
