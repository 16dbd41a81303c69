"""Weight-only quantization (int8 per channel, NF4 with double quantization) against plain numpy
references written here from the definitions (QLoRA, arXiv 2305.14314; bitsandbytes' dynamic map),
and, when installed, against bitsandbytes and qwix themselves."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jpeft.ops import quantize as Q

# ---------------------------------------------------------------------------------------------
# Independent references (float64 numpy, from the papers' definitions).

#: QLoRA, Appendix E: the published NF4 values.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def nf4_from_construction() -> np.ndarray:
    """QLoRA's NF4: 2^(k-1) = 8 quantiles of N(0, 1) for the positive half and 7 for the negative
    half, from ``linspace(offset, 1/2)`` with ``offset = 1 - (1/32 + 1/30) / 2`` (the paper's
    ``delta``), one shared zero, normalised to ``[-1, 1]``."""
    from scipy.stats import norm

    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([neg, [0.0], pos]))
    return v / v.max()


def dynamic_from_definition() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map in float64: for i = 0..6 the 2^i midpoints of
    ``linspace(0.1, 1, 2^i + 1)`` times ``10^(i - 6)``, both signs, plus 0 and 1."""
    v = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2 ** i + 1)
        m = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2
        v += list(m) + list(-m)
    return np.sort(np.array(v))


NF4 = np.asarray(PAPER_NF4)
DYN = dynamic_from_definition()


def ref_blockwise(x: np.ndarray, block: int, table: np.ndarray):
    """Blockwise absmax + nearest table entry (argmin: ties to the lower code), float64, in blocks
    of ``block`` along the last axis of ``x`` ``[..., n]`` (each row's last block short):
    ``(codes [..., n], absmax [..., K], scaled [..., n])``."""
    x = np.asarray(x, np.float64)
    x = x.reshape(1) if x.ndim == 0 else x
    lead, n = x.shape[:-1], x.shape[-1]
    blocks = -(-n // block)
    xb = np.pad(x, [(0, 0)] * len(lead) + [(0, blocks * block - n)]).reshape(lead + (blocks, block))
    absmax = np.abs(xb).max(axis=-1)
    scaled = xb / np.where(absmax > 0, absmax, 1)[..., None]
    codes = np.abs(scaled[..., None] - table).argmin(-1).reshape(lead + (-1,))[..., :n]
    return codes, absmax, scaled.reshape(lead + (-1,))[..., :n]


def per_entry(c: np.ndarray, block: int, n: int) -> np.ndarray:
    """``c [..., K]`` (one value per block of ``block`` along the last axis) as ``[..., n]``."""
    return np.repeat(c, block, axis=-1)[..., :n]


def ref_nf4(w: np.ndarray, block: int = 64):
    """(codes [..., N], absmax [..., K], dequantized [..., N]) without double quantization, row by
    row along the last axis (a 0-d weight as one entry)."""
    codes, absmax, _ = ref_blockwise(w, block, NF4)
    deq = NF4[codes] * per_entry(absmax, block, codes.shape[-1])
    return codes, absmax, deq


def ref_flat_nf4(w: np.ndarray, block: int = 64, dq_block: int | None = None):
    """The flat layout (bitsandbytes'; this module's before it stored rows): blocks of ``block``
    consecutive entries of the row-major flattened ``w``, codes packed two per byte over the whole
    flat array, and, with ``dq_block``, second-level blocks of ``dq_block`` consecutive constants
    of the flat ``[B]``: ``(packed [ceil(n / 2)], absmax [B], scale codes [B], scale scales,
    offset, dequantized [n])``, computed here from the tables."""
    x = np.asarray(w, np.float64).reshape(-1)
    codes, absmax, _ = ref_blockwise(x, block, NF4)
    padded = np.pad(codes, (0, codes.size % 2), constant_values=7).reshape(-1, 2)
    packed = (padded[:, 0] << 4 | padded[:, 1]).astype(np.uint8)
    if dq_block is None:
        return packed, absmax, None, None, None, NF4[codes] * per_entry(absmax, block, x.size)
    offset = absmax.mean()
    s_codes, s2, _ = ref_blockwise(absmax - offset, dq_block, DYN)
    c_hat = DYN[s_codes] * per_entry(s2, dq_block, absmax.size) + offset
    return packed, absmax, s_codes, s2, offset, NF4[codes] * per_entry(c_hat, block, x.size)


def unpacked(q) -> np.ndarray:
    """The NF4 codes of ``q`` (shape ``q.shape``), unpacked here row by row (high nibble first),
    independently of the module."""
    b = np.asarray(q.codes)
    n = q.shape[-1] if q.shape else 1
    return np.stack([b >> 4, b & 15], -1).reshape(b.shape[:-1] + (-1,))[..., :n].reshape(q.shape)


def rng_weight(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    # Rows of different scales, so that the block absmax varies.
    scale = rng.uniform(0.05, 3.0, shape[:-1] + (1,)) if len(shape) > 1 else 1.0
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Tables.


def test_nf4_table_is_the_papers():
    np.testing.assert_array_equal(Q.NF4_TABLE, np.asarray(PAPER_NF4, np.float32))
    np.testing.assert_allclose(Q.NF4_TABLE, nf4_from_construction(), rtol=0, atol=3e-7)
    assert Q.NF4_TABLE[7] == 0 and Q.NF4_TABLE[0] == -1 and Q.NF4_TABLE[15] == 1
    assert np.all(np.diff(Q.NF4_TABLE) > 0) and Q.NF4_TABLE.dtype == np.float32


def test_dynamic_table_is_bitsandbytes_dynamic_map():
    t = Q.DYNAMIC8_TABLE
    assert t.shape == (256,) and t.dtype == np.float32 and np.all(np.diff(t) > 0)
    assert t[127] == 0 and t[-1] == 1
    np.testing.assert_allclose(t, DYN, rtol=2e-7, atol=0)
    # Symmetric but for the extra 1.0: t[i] = -t[254 - i].
    np.testing.assert_array_equal(t[:127], -t[254:127:-1])


# ---------------------------------------------------------------------------------------------
# NF4: exact codes, packing, reference, errors.


def test_nf4_codes_on_hand_made_blocks():
    t = Q.NF4_TABLE
    mids = (t[:-1] + t[1:]) / np.float32(2)
    above = np.nextafter(mids, np.float32(2))
    # Block 0 (absmax exactly 1, so the normalised value is the input): the 16 code points,
    # the 15 midpoints (ties go down), just above each midpoint (up), +0 and -0.
    block0 = np.concatenate([t[[3, 12]], t, mids, above, [0.0, -0.0]]).astype(np.float32)
    want0 = np.concatenate([[3, 12], np.arange(16), np.arange(15), np.arange(1, 16), [7, 7]])
    block0 = np.pad(block0, (0, 64 - block0.size))
    want0 = np.pad(want0, (0, 64 - want0.size), constant_values=7)
    block1 = np.zeros(64, np.float32)                       # all zero
    block2 = np.float32(2.5) * t[np.arange(64) % 16]         # the code points, scaled
    w = np.concatenate([block0, block1, block2, t[[15, 0, 7]] * np.float32(-4)])  # short block
    want = np.concatenate([want0, np.full(64, 7), np.arange(64) % 16, [0, 15, 7]])
    for dq in (False, True):
        q = Q.quantize_nf4(jnp.asarray(w), double_quant=dq)     # 1-D: one row, the flat layout
        np.testing.assert_array_equal(unpacked(q), want)
        assert q.codes.shape == (w.size // 2 + 1,) and q.codes.dtype == jnp.uint8
        assert int(q.codes[0]) == 0x3C                       # codes 3, 12: even entry high
        assert int(q.codes[-1]) & 15 == 7                    # odd n: pad nibble is the zero code
        d = np.asarray(Q.dequantize(q))
        np.testing.assert_array_equal(d[64:128], 0)          # an all-zero block stays exactly zero
        if not dq:
            np.testing.assert_array_equal(q.scales, [1, 0, 2.5, 4])
            np.testing.assert_array_equal(d[128:192], block2)
            np.testing.assert_array_equal(d[:64], t[want0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nf4_equals_numpy_reference(dtype):
    w = jnp.asarray(rng_weight((33, 100), seed=1)).astype(dtype)   # rows of 100: blocks 64 + 36
    x = np.asarray(w.astype(jnp.float32))
    codes, absmax, deq = ref_nf4(x)
    q = Q.quantize_nf4(w, double_quant=False)
    assert q.codes.shape == (33, 50) and q.scales.shape == (33, 2)
    np.testing.assert_array_equal(unpacked(q), codes)
    np.testing.assert_array_equal(q.scales, absmax.astype(np.float32))
    # the short block's absmax is that of its own 36 entries, never of the next row
    np.testing.assert_array_equal(absmax[:, 1], np.abs(x[:, 64:]).max(1))
    assert q.shape == (33, 100) and q.dtype == dtype and q.scales.dtype == jnp.float32
    d = Q.dequantize(q)
    assert d.dtype == dtype and d.shape == (33, 100)
    np.testing.assert_allclose(Q.dequantize(q, jnp.float32), deq, rtol=1e-6, atol=0)
    # Error bound: half the widest NF4 gap times the block absmax.
    half_gap = np.diff(NF4).max() / 2
    err = np.abs(np.asarray(Q.dequantize(q, jnp.float32)) - x)
    assert np.all(err <= half_gap * per_entry(absmax, 64, 100) * (1 + 1e-6))


@pytest.mark.parametrize("shape", [(16, 192), (3, 5, 128), (2, 256, 64), (4, 16384)])
def test_rows_of_whole_blocks_store_the_flat_layout(shape):
    """When the last axis is even and a multiple of 64, blocks of 64 consecutive entries of the
    flattened weight never cross rows: the row layout is the flat one reshaped, bit for bit (the
    4-bit bytes, the block constants, the dequantized values, computed here from the NF4 table).
    With double quantization the second level is per row of constants: the flat one where rows
    hold a multiple of 256 blocks (``(4, 16384)``), close to it otherwise."""
    w = rng_weight(shape, seed=15)
    packed, absmax, _, _, _, deq = ref_flat_nf4(w)
    q = Q.quantize_nf4(jnp.asarray(w), double_quant=False)
    assert q.codes.shape == shape[:-1] + (shape[-1] // 2,)
    assert q.scales.shape == shape[:-1] + (shape[-1] // 64,)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed)
    np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), absmax.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(Q.dequantize(q)).reshape(-1),
                                  deq.astype(np.float32))
    assert q.nbytes == packed.size + 4 * absmax.size                  # the flat layout's bytes
    qd = Q.quantize_nf4(jnp.asarray(w))
    np.testing.assert_array_equal(qd.codes, q.codes)
    packed, absmax, s_codes, s2, offset, deq = ref_flat_nf4(w, dq_block=256)
    np.testing.assert_allclose(qd.scale_offset, offset, rtol=1e-6)
    blocks = shape[-1] // 64
    rows = math.prod(shape[:-1])
    assert qd.scale_scales.shape == shape[:-1] + (-(-blocks // 256),)
    if blocks % 256 == 0:
        np.testing.assert_allclose(np.asarray(qd.scale_scales).reshape(-1), s2, rtol=1e-6)
        assert np.mean(np.asarray(qd.scales).reshape(-1) == s_codes) > 0.99   # float32 ties
        np.testing.assert_allclose(np.asarray(Q.dequantize(qd)).reshape(-1), deq, rtol=1e-5,
                                   atol=1e-6 * np.abs(w).max())
        assert qd.nbytes == Q.nf4_nbytes(shape) == (packed.size + absmax.size + 4 * s2.size + 4)
    else:
        # one second-level block per row of constants: its max over the row
        c = absmax.reshape(rows, blocks)
        np.testing.assert_allclose(np.asarray(qd.scale_scales).reshape(-1),
                                   np.abs(c - offset).max(1), rtol=1e-6, atol=1e-6 * c.max())
        assert qd.nbytes == packed.size + absmax.size + 4 * rows + 4


def test_second_level_blocks_run_along_each_row_of_constants():
    """Rows of 301 blocks: two second-level blocks per row (256 + 45 constants), each with its own
    scale; one offset for the whole weight."""
    n = 64 * 300 + 5
    w = rng_weight((5, n), seed=16)
    w = w * per_entry(np.random.default_rng(17).uniform(0.1, 4, (5, 301)), 64, n)
    w = jnp.asarray(w.astype(np.float32))
    q = Q.quantize_nf4(w)
    c = np.asarray(Q.quantize_nf4(w, double_quant=False).scales, np.float64)   # [5, 301]
    offset = c.mean()
    np.testing.assert_allclose(q.scale_offset, offset, rtol=1e-6)
    s_codes, s2, scaled = ref_blockwise(c - offset, 256, DYN)
    assert q.scales.shape == (5, 301) and q.scale_scales.shape == (5, 2) == s2.shape
    np.testing.assert_allclose(q.scale_scales, s2, rtol=1e-6)
    np.testing.assert_allclose(q.scale_scales[:, 1], np.abs(c[:, 256:] - offset).max(1), rtol=1e-6)
    dist = np.abs(scaled[..., None] - DYN)
    chosen = np.take_along_axis(dist, np.asarray(q.scales)[..., None].astype(int), -1)[..., 0]
    assert np.all(chosen <= dist.min(-1) + 1e-6)
    c_hat = np.asarray(Q.nf4_absmax(q), np.float64)
    np.testing.assert_allclose(c_hat, DYN[np.asarray(q.scales)] * per_entry(s2, 256, 301) + offset,
                               rtol=1e-5, atol=1e-7)
    assert np.all(np.abs(c_hat - c) <= np.diff(DYN).max() / 2 * per_entry(s2, 256, 301)
                  * (1 + 1e-5))


def test_double_quantization_of_the_constants():
    # B = 522 blocks of 64 (last short): three second-level blocks of 256 (last short).
    n = 64 * 521 + 3
    w = rng_weight((n,), seed=2) * np.repeat(np.random.default_rng(3).uniform(0.1, 4, 522), 64)[:n]
    w = jnp.asarray(w.astype(np.float32))
    plain = Q.quantize_nf4(w, double_quant=False)
    q = Q.quantize_nf4(w)
    np.testing.assert_array_equal(q.codes, plain.codes)             # the 4-bit codes do not change
    c = np.asarray(plain.scales, np.float64)
    offset = c.mean()
    assert q.scales.shape == (522,) and q.scales.dtype == jnp.uint8
    assert q.scale_scales.shape == (3,) and q.scale_scales.dtype == jnp.float32
    assert q.scale_offset.shape == () and q.scale_offset.dtype == jnp.float32
    np.testing.assert_allclose(q.scale_offset, offset, rtol=1e-6)
    _, s2, scaled = ref_blockwise(c - offset, 256, DYN)
    np.testing.assert_allclose(q.scale_scales, s2, rtol=1e-6)
    # Each 8-bit code is a nearest entry of the dynamic map (up to float32 rounding).
    dist = np.abs(scaled[:, None] - DYN)
    chosen = dist[np.arange(c.size), np.asarray(q.scales)]
    assert np.all(chosen <= dist.min(1) + 1e-6)
    # Reconstruction: |c - c_hat| <= (half the widest gap of the map) * s2, here measured.
    c_hat = np.asarray(Q.nf4_absmax(q), np.float64)
    s2_each = np.repeat(s2, 256)[:c.size]
    rel = np.abs(c_hat - c) / s2_each
    assert rel.max() <= np.diff(DYN).max() / 2 * (1 + 1e-5)     # 0.00703
    assert rel.max() > 0.003                                      # it is a real quantization
    np.testing.assert_allclose(Q.nf4_absmax(plain), c.astype(np.float32))
    # Weights: the bound of the single level plus the constants' error.
    x = np.asarray(w, np.float64)
    err = np.abs(np.asarray(Q.dequantize(q), np.float64) - x)
    bound = np.diff(NF4).max() / 2 * np.repeat(c, 64)[:n] + np.repeat(np.abs(c_hat - c), 64)[:n]
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7)


def test_double_quantization_of_equal_constants_is_exact():
    w = jnp.tile(jnp.asarray(Q.NF4_TABLE) * 3, 64)                # 64 blocks, each absmax 3
    q = Q.quantize_nf4(w)
    np.testing.assert_array_equal(q.scales, 127)                  # d = 0: the map's zero
    np.testing.assert_array_equal(Q.nf4_absmax(q), 3)
    np.testing.assert_array_equal(Q.dequantize(q), w)


def test_pack_nibbles_round_trip_and_order():
    rng = np.random.default_rng(4)
    for n in (1, 2, 7, 64, 1001):
        codes = rng.integers(0, 16, n).astype(np.uint8)
        packed = Q.pack_nibbles(codes)
        assert packed.shape == (-(-n // 2),) and packed.dtype == jnp.uint8
        np.testing.assert_array_equal(Q.unpack_nibbles(packed, n), codes)
    np.testing.assert_array_equal(Q.pack_nibbles(np.array([1, 2, 3])), [0x12, 0x30])
    np.testing.assert_array_equal(Q.pack_nibbles(np.array([15, 0, 3]), fill=7), [0xF0, 0x37])
    # along the last axis, each row on its own (an odd row padded with ``fill``)
    rows = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(Q.pack_nibbles(rows, fill=7), [[0x12, 0x37], [0x45, 0x67]])
    np.testing.assert_array_equal(Q.unpack_nibbles(Q.pack_nibbles(rows), 3), rows)


def test_odd_sizes_and_block_sizes():
    for shape, bs, dqb in [((5,), 64, 256), ((3, 7, 5), 16, 4), ((130,), 7, 3), ((1,), 64, 256),
                           ((), 64, 256), ((4, 9, 33), 8, 2), ((2, 1), 64, 256)]:
        w = jnp.asarray(rng_weight(shape, seed=5))
        q = Q.quantize_nf4(w, block_size=bs, double_quant_block_size=dqb)
        n = shape[-1] if shape else 1
        blocks = -(-n // bs)
        want = Q.nf4_shapes(shape, bs, True, dqb)
        assert want == {"codes": shape[:-1] + (-(-n // 2),), "scales": shape[:-1] + (blocks,),
                        "scale_scales": shape[:-1] + (-(-blocks // dqb),), "scale_offset": ()}
        assert {k: getattr(q, k).shape for k in want} == want
        assert q.nbytes == Q.nf4_nbytes(shape, bs, True, dqb)
        codes, absmax, _ = ref_nf4(np.asarray(w), bs)
        np.testing.assert_array_equal(unpacked(q), codes.reshape(shape))
        if n % 2:
            np.testing.assert_array_equal(np.asarray(q.codes)[..., -1] & 15, 7)   # rows' pads
        d = Q.dequantize(q)
        assert d.shape == shape
        err = np.abs(np.asarray(d).reshape(absmax.shape[:-1] + (n,)) - np.asarray(w).reshape(
            absmax.shape[:-1] + (n,)))
        c = per_entry(absmax, bs, n)
        c_hat = per_entry(np.asarray(Q.nf4_absmax(q)), bs, n)
        assert np.all(err <= 0.152 * c + np.abs(c_hat - c) + 1e-6)


# ---------------------------------------------------------------------------------------------
# int8.


def ref_int8(w: np.ndarray, reduce_axes: tuple[int, ...]):
    w = np.asarray(w, np.float64)
    absmax = np.abs(w).max(axis=reduce_axes, keepdims=True)
    codes = np.clip(np.round(w * 127 / np.where(absmax > 0, absmax, 1)), -127, 127)
    return codes.astype(np.int8), absmax / 127


@pytest.mark.parametrize("axis,reduce", [(-1, (0, 1)), (0, (1, 2)), ((0, 2), (1,)), ((), (0, 1, 2))])
def test_int8_equals_numpy_reference(axis, reduce):
    w = rng_weight((4, 7, 6), seed=6)
    q = Q.quantize_int8(jnp.asarray(w), axis=axis)
    codes, scales = ref_int8(w, reduce)
    np.testing.assert_array_equal(q.codes, codes)
    assert q.codes.dtype == jnp.int8 and q.scales.dtype == jnp.float32
    assert q.scales.shape == scales.shape
    np.testing.assert_allclose(q.scales, scales, rtol=1e-6)
    err = np.abs(np.asarray(Q.dequantize(q), np.float64) - w)
    assert np.all(err <= scales / 2 * (1 + 1e-5) + 1e-7)
    assert q.nbytes == Q.int8_nbytes(w.shape, axis) == w.size + 4 * scales.size


def test_int8_hand_made_channels_and_bf16():
    # Column 0: absmax 127 (scale 1): halves round to even; column 1 all zero; column 2 negative max.
    w = np.array([[0.5, 0, -2], [1.5, 0, 1], [2.5, 0, 0.5], [-2.5, 0, 0.25], [126.5, 0, 0],
                  [127, 0, 0]], np.float32)
    q = Q.quantize_int8(jnp.asarray(w))
    np.testing.assert_array_equal(q.codes[:, 0], [0, 2, 2, -2, 126, 127])
    np.testing.assert_array_equal(q.codes[:, 1], 0)
    np.testing.assert_array_equal(q.codes[:, 2], [-127, 64, 32, 16, 0, 0])  # 63.5 -> 64, 31.75 -> 32
    np.testing.assert_array_equal(q.scales, [[1, 0, np.float32(2) / 127]])
    np.testing.assert_array_equal(Q.dequantize(q)[:, 1], 0)
    wb = jnp.asarray(w).astype(jnp.bfloat16)
    qb = Q.quantize_int8(wb, axis=1)
    codes, _ = ref_int8(np.asarray(wb.astype(jnp.float32)), (0,))
    np.testing.assert_array_equal(qb.codes, codes)
    assert qb.dtype == jnp.bfloat16 and Q.dequantize(qb).dtype == jnp.bfloat16
    assert Q.dequantize(qb, jnp.float32).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Bytes.


def test_bytes_of_a_1024_square_float32_weight():
    spec = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
    f32 = 4 * 1024 * 1024
    q8 = jax.eval_shape(Q.quantize_int8, spec)
    nf4 = jax.eval_shape(Q.quantize_nf4, spec)
    nf4_plain = jax.eval_shape(lambda w: Q.quantize_nf4(w, double_quant=False), spec)
    assert q8.nbytes == Q.int8_nbytes((1024, 1024)) == 1024 * 1024 + 4 * 1024 == 1_052_672
    # 4 bits + 8 bits / 64 + one float32 per row of 1024 (its 16 constants' second-level scale),
    # plus the 4-byte offset: 4.156 bits per entry.
    assert nf4.nbytes == Q.nf4_nbytes((1024, 1024)) == 2 ** 19 + 2 ** 14 + 4 * 1024 + 4 == 544_772
    assert nf4_plain.nbytes == 2 ** 19 + 4 * 2 ** 14 == 589_824
    assert 3.98 < f32 / q8.nbytes < 4.0
    assert 7.69 < f32 / nf4.nbytes < 7.71                             # 7.699
    assert abs(8 * nf4.nbytes / 2 ** 20 - (4 + 8 / 64 + 32 / 1024)) < 1e-4
    assert 7.1 < f32 / nf4_plain.nbytes < 7.2                        # 7.111
    # rows of 16384 (256 constants, one second-level block each): the flat layout's 4.127 bits
    wide = jax.eval_shape(Q.quantize_nf4, jax.ShapeDtypeStruct((64, 16384), jnp.float32))
    assert wide.nbytes == Q.nf4_nbytes((64, 16384)) == 2 ** 19 + 2 ** 14 + 4 * 64 + 4 == 540_932
    assert abs(8 * wide.nbytes / 2 ** 20 - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4


# ---------------------------------------------------------------------------------------------
# Pytree, jit, gradients, sharding, orbax.


def test_pytree_round_trip_and_jit():
    w = jnp.asarray(rng_weight((16, 96), seed=7))
    q = Q.quantize_nf4(w)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 4
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (back.scheme, back.shape, back.dtype, back.block_size) == ("nf4", (16, 96), w.dtype, 64)
    np.testing.assert_array_equal(Q.dequantize(back), Q.dequantize(q))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert paths == [".codes", ".scales", ".scale_scales", ".scale_offset"]
    q8 = Q.quantize_int8(w)
    assert len(jax.tree_util.tree_leaves(q8)) == 2                   # no None leaves
    assert jax.tree_util.tree_structure(q8) != jax.tree_util.tree_structure(Q.quantize_int8(w, 0))
    params = {"dense": {"kernel": q, "bias": jnp.zeros(96)}, "out": {"kernel": q8}}
    mapped = jax.tree_util.tree_map(lambda x: x, params)
    assert isinstance(mapped["dense"]["kernel"], Q.QuantizedArray)
    # Through jit as an argument and as a result.
    f = jax.jit(lambda p, x: x @ Q.dequantize(p["dense"]["kernel"])
                + Q.dequantize(p["out"]["kernel"])[0])
    x = jnp.ones((2, 16))
    np.testing.assert_allclose(f(params, x), x @ Q.dequantize(q) + Q.dequantize(q8)[0], rtol=1e-6)
    qj = jax.jit(Q.quantize_nf4, static_argnames=("block_size", "double_quant"))(w)
    np.testing.assert_array_equal(Q.dequantize(qj), Q.dequantize(q))
    assert "nf4" in repr(q) and "(16, 96)" in repr(q)


def test_gradients_flow_to_the_float_children():
    w = jnp.asarray(rng_weight((8, 128), seed=8))
    g = jnp.asarray(rng_weight((8, 128), seed=9))
    q8 = Q.quantize_int8(w)
    grad = jax.grad(lambda s: jnp.sum(Q.dequantize(dataclasses.replace(q8, scales=s)) * g))(q8.scales)
    np.testing.assert_allclose(grad, np.sum(np.asarray(q8.codes) * np.asarray(g), 0, keepdims=True),
                               rtol=1e-5)
    qn = Q.quantize_nf4(w, double_quant=False)
    grad = jax.grad(lambda s: jnp.sum(Q.dequantize(dataclasses.replace(qn, scales=s)) * g))(qn.scales)
    want = (NF4[unpacked(qn)] * np.asarray(g)).reshape(8, 2, 64).sum(-1)          # [8, 2]
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)
    qd = Q.quantize_nf4(w)
    grad = jax.grad(lambda o: jnp.sum(Q.dequantize(dataclasses.replace(qd, scale_offset=o)) * g))(
        qd.scale_offset)
    np.testing.assert_allclose(grad, np.sum(NF4[unpacked(qd)] * np.asarray(g)), rtol=1e-4)


def test_sharded_leaves(mesh):
    w = jnp.asarray(rng_weight((32, 64), seed=10))
    q8 = Q.quantize_int8(w)
    s8 = jax.device_put(q8, Q.QuantizedArray(NamedSharding(mesh, P("data", "model")),
                                             NamedSharding(mesh, P(None, "model")),
                                             scheme="int8", shape=q8.shape, dtype=q8.dtype, axis=(1,)))
    assert s8.codes.sharding.spec == P("data", "model")
    np.testing.assert_array_equal(jax.jit(Q.dequantize)(s8), Q.dequantize(q8))
    # NF4 stored like the weight: each device holds its [16, 128] shard of the weight as
    # [16, 64] bytes of codes and [16, 2] block constants.
    wn = jnp.asarray(rng_weight((32, 512), seed=10))
    qn = Q.quantize_nf4(wn)
    sh = Q.stored_shardings(qn, NamedSharding(mesh, P("data", "model")))
    assert isinstance(sh, Q.QuantizedArray)
    assert sh.codes.spec == P("data", "model") == sh.scales.spec
    assert sh.scale_scales.spec == P("data") and sh.scale_offset.spec == P()
    sn = jax.device_put(qn, sh)
    assert sn.codes.addressable_shards[0].data.shape == (16, 64)
    assert sn.scales.addressable_shards[0].data.shape == (16, 2)
    np.testing.assert_array_equal(jax.jit(Q.dequantize)(sn), Q.dequantize(qn))
    # A mesh with explicit axes (jax.make_mesh's default): the table lookups keep the sharding.
    explicit = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    se = jax.device_put(qn, Q.stored_shardings(qn, NamedSharding(explicit, P(None, "x"))))
    assert se.codes.sharding.spec == P(None, "x") and se.scales.sharding.spec == P(None, "x")
    d = Q.dequantize(se)
    assert d.sharding.spec == P(None, "x")
    np.testing.assert_array_equal(d, Q.dequantize(qn))


def test_stored_specs_follow_the_weight(mesh):
    """Each stored array takes the weight's spec: the leading axes as the weight's; the last one
    where every shard of a row holds whole blocks and whole bytes, replicated otherwise; the
    second-level scales' short last axis and the offset whole; int8 scales on their channel
    axes."""
    sd = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    nf4 = lambda shape, **kw: jax.eval_shape(functools.partial(Q.quantize_nf4, **kw), sd(shape))
    specs = lambda q, spec: Q.stored_specs(q, spec, mesh)
    col = P(None, "data", "model")
    # [L, in, out]: 512 / 4 = 128 entries per shard, two blocks of 64
    assert specs(nf4((3, 32, 512)), col) == {
        "codes": col, "scales": col, "scale_scales": P(None, "data"), "scale_offset": P()}
    assert specs(nf4((3, 32, 512), double_quant=False), col) == {"codes": col, "scales": col}
    # 96 / 4 = 24 entries per shard cut a block of 64: the last axis whole on every device
    assert specs(nf4((3, 32, 96)), col) == {
        "codes": P(None, "data"), "scales": P(None, "data"), "scale_scales": P(None, "data"),
        "scale_offset": P()}
    # block size 32: 128 / 4 = 32 per shard, whole blocks and bytes
    assert specs(nf4((32, 128), block_size=32), P("data", "model"))["codes"] == P("data", "model")
    # odd block size 3: 24 / 4 = 6 per shard (two blocks, three bytes): split; 12 / 4 = 3 entries
    # per shard would cut a byte: whole
    assert specs(nf4((8, 24), block_size=3), P(None, "model"))["codes"] == P(None, "model")
    assert specs(nf4((8, 12), block_size=3), P(None, "model"))["codes"] == P()
    # row-parallel [in, out] with the out axis over both mesh axes: 1024 / 8 = 128
    assert specs(nf4((16, 1024)), P("model", ("data", "model")))["scales"] == P(
        "model", ("data", "model"))
    assert specs(nf4((512,)), P("model"))["codes"] == P("model")           # 1-D: one row
    assert specs(nf4(()), P()) == {"codes": P(), "scales": P(), "scale_scales": P(),
                                   "scale_offset": P()}
    assert specs(nf4((3, 32, 512)), P()) == {"codes": P(), "scales": P(), "scale_scales": P(),
                                             "scale_offset": P()}
    q8 = jax.eval_shape(lambda w: Q.quantize_int8(w, axis=(0, 2)), sd((3, 32, 512)))
    assert specs(q8, col) == {"codes": col, "scales": P(None, None, "model")}
    q8 = jax.eval_shape(lambda w: Q.quantize_int8(w, axis=1), sd((32, 512)))
    assert specs(q8, P("data", "model")) == {"codes": P("data", "model"),
                                             "scales": P(None, "model")}
    with pytest.raises(ValueError, match="more axes"):
        specs(nf4((512,)), P(None, "model"))


@pytest.mark.parametrize("shape,spec,whole", [
    ((2, 32, 512), P(None, "data", "model"), True),      # column-parallel, stacked
    ((2, 512, 32 * 64), P(None, "model", "data"), True),  # row-parallel, stacked
    ((32, 96), P("data", "model"), False),                # last axis cuts a block: stored whole
])
def test_dequantize_shards_with_no_gather(mesh, shape, spec, whole):
    """Stored arrays sharded like the weight (stored_shardings) dequantize to the weight's own
    sharding with no collective in the compiled program: each device decodes its own shard (the
    flat layout needed the whole weight on every device: XLA's "involuntary full
    rematerialization"). Where the stored last axis is whole (a shard would cut a block) nothing
    is gathered either; XLA may exchange the row ends between neighbours (collective-permute)."""
    w = jnp.asarray(rng_weight(shape, seed=18))
    target = NamedSharding(mesh, spec)
    banned = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter")
    for q in (Q.quantize_nf4(w), Q.quantize_nf4(w, double_quant=False),
              Q.quantize_int8(w, axis=(0, len(shape) - 1))):
        sq = jax.device_put(q, Q.stored_shardings(q, target))
        f = jax.jit(lambda q: Q.dequantize(q, jnp.bfloat16), out_shardings=target)
        text = f.lower(sq).compile().as_text()
        for op in banned + (("collective-permute",) if whole or q.scheme == "int8" else ()):
            assert op not in text, (q, op)
        np.testing.assert_array_equal(f(sq), Q.dequantize(q, jnp.bfloat16))


def test_orbax_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    w = jnp.asarray(rng_weight((16, 96), seed=11))
    tree = {"a": Q.quantize_nf4(w), "b": Q.quantize_int8(w),
            "c": Q.quantize_nf4(w, double_quant=False)}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "q", tree)
        ckpt.wait_until_finished()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
        back = ckpt.restore(tmp_path / "q", abstract)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for k in tree:
        np.testing.assert_array_equal(Q.dequantize(back[k]), Q.dequantize(tree[k]))


def test_errors():
    with pytest.raises(ValueError, match="floating-point.*int32"):
        Q.quantize_nf4(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match=r"no entries \(shape \(0, 3\)\)"):
        Q.quantize_int8(jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match="axis 2 is out of range for shape"):
        Q.quantize_int8(jnp.zeros((2, 3)), axis=2)
    with pytest.raises(ValueError, match="repeats"):
        Q.quantize_int8(jnp.zeros((2, 3)), axis=(1, -1))
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        Q.quantize_nf4(jnp.zeros((64,)), block_size=0)
    with pytest.raises(ValueError, match="double_quant must be a bool"):
        Q.quantize_nf4(jnp.zeros((64,)), double_quant=1)
    with pytest.raises(ValueError, match="not an nf4"):
        Q.nf4_absmax(Q.quantize_int8(jnp.ones((2, 2))))


# ---------------------------------------------------------------------------------------------
# Optional cross-checks against the libraries (not test dependencies: skipped when absent).


def test_against_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    import torch
    np.testing.assert_array_equal(bnb_f.create_dynamic_map().numpy(), Q.DYNAMIC8_TABLE)
    np.testing.assert_array_equal(bnb_f.get_4bit_type("nf4", device="cpu").numpy(), Q.NF4_TABLE)
    # Rows of whole blocks (the last axis even and a multiple of 64): bitsandbytes' flat blocks
    # never cross rows, so its flat arrays are ours flattened. (Other rows are stored per row
    # here: a different, per-row blocking by design.)
    for shape, tdt, jdt in [((64, 320), torch.float32, jnp.float32),
                            ((48, 128), torch.bfloat16, jnp.bfloat16),
                            ((4, 16384), torch.float32, jnp.float32)]:
        x = rng_weight(shape, seed=12)
        wt = torch.from_numpy(x).to(tdt)
        wj = jnp.asarray(x).astype(jdt)
        # Without double quantization: the same bytes and the same dequantized values.
        packed, st = bnb_f.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=False)
        q = Q.quantize_nf4(wj, double_quant=False)
        np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
        np.testing.assert_array_equal(np.asarray(q.scales).reshape(-1), st.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(Q.dequantize(q).astype(jnp.float32)),
                                      bnb_f.dequantize_4bit(packed, st).float().numpy())
        # With: same 4-bit bytes and offset. The second level is bitsandbytes' where a row holds
        # a multiple of 256 constants ((4, 16384)): the 8-bit constant codes agree but where
        # bitsandbytes' binary search is not the nearest entry (then ours is nearer).
        packed, st = bnb_f.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=True)
        q = Q.quantize_nf4(wj)
        np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
        np.testing.assert_allclose(q.scale_offset, st.offset.item(), rtol=1e-6)
        if shape[-1] % (64 * 256):
            continue
        np.testing.assert_allclose(np.asarray(q.scale_scales).reshape(-1),
                                   st.state2.absmax.numpy(), rtol=1e-6)
        assert np.mean(np.asarray(q.scales).reshape(-1) == st.absmax.numpy()) > 0.98
        c = np.asarray(Q.quantize_nf4(wj, double_quant=False).scales, np.float64).reshape(-1)
        theirs = (bnb_f.dequantize_blockwise(st.absmax, st.state2) + st.offset).numpy()
        ours = np.asarray(Q.nf4_absmax(q)).reshape(-1)
        assert np.all(np.abs(ours - c) <= np.abs(theirs - c) + 1e-6 * c.max())
    # int8: bitsandbytes' row-wise (LLM.int8) quantization is axis=0 of a [out, in] weight.
    x = rng_weight((64, 96), seed=13)
    cb, row_stats, _ = bnb_f.int8_vectorwise_quant(torch.from_numpy(x))
    q8 = Q.quantize_int8(jnp.asarray(x), axis=0)
    np.testing.assert_array_equal(q8.codes, cb.numpy())
    np.testing.assert_allclose(np.asarray(q8.scales).reshape(-1) * 127, row_stats.numpy(), rtol=1e-6)


def test_against_qwix_nf4():
    qwix = pytest.importorskip("qwix")
    # qwix tiles along axes: per row (channelwise axis 0) and tiles of 64 along axis 1 are our
    # blocks of 64 consecutive entries. qwix normalises in the input dtype, so float32 here.
    x = rng_weight((48, 192), seed=14)
    for w in (jnp.asarray(x), jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)):
        qa = qwix.quantize(w, "nf4", channelwise_axes=[0], tiled_axes={1: 64})
        q = Q.quantize_nf4(w, double_quant=False)
        np.testing.assert_array_equal(unpacked(q).reshape(w.shape),
                                      np.asarray(qa.qvalue).astype(np.uint8))
        np.testing.assert_array_equal(q.scales, np.asarray(qa.scale).reshape(48, 3))
        np.testing.assert_array_equal(Q.dequantize(q), qwix.dequantize(qa))
