"""How a store's rows of values become bytes on disk and back: one codec per store ``dtype``.

A codec is bound to the store's ``fields`` (analog.storage.rows) and maps a batch of rows,
(B, row_elems) values, to (B, row_bytes) bytes and back. ``store.json``'s ``"dtype"`` names it.

``float32`` / ``float16`` / ``bfloat16``
    row = the row_elems values in that dtype (row_bytes = row_elems × 4 or 2). Reads are views
    of the memory map (no copy) and keep that dtype.

``int8`` / ``int4``
    row = the F per-field scales as float32 (4F bytes, in field order) followed by the row_elems
    quantised values. Each field f (one module's one log kind) of each row is quantised
    symmetrically by its absolute maximum, with L = 127 levels a side (int8) or L = 7 (int4)::

        scale_f = max_j |x_fj| / L              (float32; 0 for an all-zero field)
        q_fj    = clamp(round(x_fj / scale_f), -L, L)   (round half to even; 0 where scale_f = 0)
        x̂_fj    = q_fj · scale_f                (what readers return, float32)

    int8: the q as int8, one byte each (row_bytes = 4F + row_elems).
    int4: the q as 4-bit two's complement nibbles (q & 0xF: -7..-1 is 0x9..0xF, 0..7 is 0x0..0x7;
    0x8 is never written, and a corrupt one, which the chunk checksum catches, would read as -8),
    packed over the row's concatenated values, not per field: value j of the row (field after
    field) is the low nibble of byte j // 2 when j is even and its high nibble when j is odd; an
    odd row_elems leaves the last byte's high nibble 0. A field may therefore start mid-byte, and
    every row is 4F + ceil(row_elems / 2) bytes.

    Error bound: |x − x̂| ≤ scale_f / 2 per element in exact arithmetic; with the float32 division
    (relative error ≤ 2⁻²⁴ on |x/scale| ≤ L) and product (≤ 2⁻²⁴ of |q·scale| ≤ L·scale) it is
    ≤ scale_f / 2 · (1 + 4L·2⁻²⁴): ≤ scale_f / 2 · (1 + 2⁻¹⁵) for int8, (1 + 2⁻¹⁹) for int4. The
    bound is relative to the field's largest value: scale_f / 2 = max|x_f| / 254 (int8) or
    max|x_f| / 14 (int4). (Fields whose max |x| is below float32's normal range, ~1.5e-36, get a
    subnormal scale; their error is below 1e-42 absolute.) Values are cast to float32 before
    quantising. A non-finite value cannot be stored: a batch holding one is refused
    (``NonFiniteRows``), naming the field and rows. Reads dequantise only the rows asked for, into
    a new float32 tensor.

``int2``
    row = the F per-field scales σ_f (float32) followed by the row_elems 2-bit codes, four a byte.
    Each field f of each row is first rotated, y_f = R_n x_f with the fixed orthogonal randomised
    Hadamard transform of its n values (analog.storage.rotation; store.json records it as
    ``"rotation": "hadamard-v1"``), which makes every coordinate a signed sum of all the field's values,
    close to Gaussian whatever the field holds. y_f is then quantised by its root mean square to the four
    levels of the Lloyd–Max quantiser of a standard Gaussian (the levels and thresholds minimising
    E(z − ẑ)² for z ~ N(0, 1): thresholds 0, ±T with T = 0.9816, levels ±a = ±0.4528 and ±b = ±1.5104)::

        y_f   = R_n x_f                         (float32; ‖y_f‖ = ‖x_f‖)
        σ_f   = sqrt(mean_j y_fj²) = ‖y_f‖₂ / √n  (float32; a field whose Σy² over- or underflows
                                               is rescaled by its max |y|; 0 for an all-zero field)
        c_fj  = clamp(⌊y_fj · r_f⌋, −2, 1) + 2,  r_f = 1 / (T·σ_f) in float32 (0 where σ_f = 0)
                (0: y < −Tσ, level −b; 1: −Tσ ≤ y < 0, −a; 2: 0 ≤ y < Tσ, +a; 3: y ≥ Tσ, +b)
        x̂_f   = R_nᵀ (LEVEL[c_f] · σ_f)          (what readers return, float32; 0 where σ_f = 0)

    Code j of the row (over the row's concatenated values, as int4) is bits 2(j mod 4), 2(j mod 4)+1
    of byte j // 4; unused trailing bits are 0. Each row is 4F + ceil(row_elems / 4) bytes: at the
    bytes of float32 it stores 16× the sketch dimension (LoGra rank 64 in int2, 4 + 1024 bytes a
    module, ≈ rank 16 in float32).

    There is no per-element bound: this is a mean-square code for Gaussian values, which the rotation
    provides. For Gaussian y the mean squared error is 0.1175 σ², and the levels are the centroids of
    their intervals, so E[ŷ y] = E[ŷ²] = 0.8825 σ²: an inner product ⟨x̂, q⟩ = ⟨ŷ, R q⟩ with an
    unquantised q is shrunk by about 0.88 on average (the same for every row, so rankings keep) plus
    noise. Rotated values larger than b·σ are clipped to b·σ. Without the rotation, fields far from
    Gaussian lose much more (digits' one-token gradients, LoGra rank 64: LDS 0.507 unrotated, 0.593
    rotated; benchmarks/results/attribution_lm_summary.md run 15); on a small LM, whose sketches are already
    near Gaussian, the rotation cost up to 0.017 LDS (run 16). Non-finite values are refused as in
    int8/int4. A store written before the rotation (no ``"rotation"`` in store.json) is refused, not misread.

Reading one field (``decode_field``): field f of k rows without decoding the rest of the row. A float
store gives a view of the field's columns of the memory map. A quantised store reads the field's scale
and only the bytes holding its values: int4 and int2 from the byte holding its first value (which it
may share with the field before), skipping the values in front of it; an int2 field is then rotated
back (R⁻¹ of that field alone: the rotation never mixes fields). Reading field f of k rows into an
``out`` of k × n_f values touches k · ``read_bytes(f)`` mapped bytes (page cache) and allocates at most
k · n_f · ``work_bytes`` bytes while it decodes (the float32 values, the unpacked codes and, in int2,
the rotation's products; 0 for a float store, which converts straight from the map into ``out``). The
values equal those columns of ``decode`` of whole rows.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from analog.storage.rotation import Rotation
from analog.storage.rows import Fields, field_size

#: int4 packing reads byte pairs as int16 where the first byte is the low one
_LITTLE_ENDIAN = sys.byteorder == "little"


class NonFiniteRows(ValueError):
    """Rows holding NaN or ±Inf in ``field``, which the store's dtype cannot hold; ``rows`` are their positions."""

    def __init__(self, rows: List[int], field: Dict[str, Any], dtype: str):
        self.rows, self.field = rows, field
        super().__init__(f"non-finite values in module {field['module']!r} ({field['kind']} log) of batch row(s) "
                         f"{rows[:10]}: an {dtype} store cannot hold NaN or Inf")


class FieldLayout:
    """Where each field's values sit in a row: ``sizes[f]`` values from ``offsets[f]`` (C order, field
    after field, analog.storage.rows); ``row_elems`` = Σ sizes."""

    #: keys a codec adds to store.json and requires of a store it reads (none, unless it says), and why
    #: a store lacking them is refused
    header: Dict[str, Any] = {}
    header_missing = ""

    def __init__(self, fields: Fields):
        self.fields = fields
        self.sizes = [field_size(f) for f in fields]
        self.offsets = np.cumsum([0] + self.sizes[:-1]).tolist()
        self.row_elems = sum(self.sizes)

    def check_field(self, f: int) -> None:
        if not 0 <= f < len(self.fields):
            raise IndexError(f"field {f} out of range: the store has {len(self.fields)} fields")


class FloatRows(FieldLayout):
    """Rows stored as they are, in one floating dtype: ``value_dtype`` on disk and when read."""

    #: bytes a ``decode_field`` allocates per value: none (a view, or converted straight into ``out``)
    work_bytes = 0

    def __init__(self, fields: Fields, value_dtype: torch.dtype, np_dtype):
        super().__init__(fields)
        self.value_dtype, self.np_dtype = value_dtype, np_dtype
        self.itemsize = np.dtype(np_dtype).itemsize
        self.row_bytes = self.row_elems * self.itemsize

    #: encode may return a view of its input (the writer then keeps the rows it was given)
    copies = False

    def encode(self, rows: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """(B, row_elems) values -> (B, row_bytes) uint8: the values cast to the store dtype, as bytes
        (a view of ``rows`` when they already are contiguous in that dtype; ``overwrite`` is ignored)."""
        values = rows.detach().to(self.value_dtype).contiguous()
        if not values.numel():
            return torch.empty(len(values), self.row_bytes, dtype=torch.uint8)
        return values.view(torch.uint8)

    def decode(self, raw: np.ndarray) -> torch.Tensor:
        """(k, row_bytes) uint8 of consecutive rows (e.g. a slice of the memory map) -> (k, row_elems),
        a view of ``raw``."""
        t = torch.from_numpy(raw.view(self.np_dtype))
        return t.view(torch.bfloat16) if self.value_dtype == torch.bfloat16 else t

    def decode_field(self, raw: np.ndarray, f: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(k, row_bytes) uint8 -> field ``f``'s (k, n_f) values: a view of ``raw``'s columns, or copied
        (converted) into ``out``, a (k, n_f) tensor of any float dtype, which is returned."""
        self.check_field(f)
        o, s = self.offsets[f], self.sizes[f]
        view = self.decode(raw)[:, o : o + s]
        return view if out is None else out.copy_(view)

    def read_bytes(self, f: int) -> int:
        """Bytes of a row that ``decode_field(·, f)`` reads."""
        return self.sizes[f] * self.itemsize


class ScaledRows(FieldLayout):
    """Rows stored as one float32 scale per field followed by the row's quantised values: what the
    quantised codecs share (the float32 working copy, the refusal of non-finite scales, the scale
    bytes, and decoding field by field as the unscaled values times the field's scale). Subclasses say
    how a scale is taken, how values become bytes (``per_byte``, ``encode``) and back (``unscaled``)."""

    value_dtype = torch.float32
    name: str
    #: values a byte holds, packed over the whole row (a field may start mid-byte when above 1)
    per_byte: int
    #: bytes ``decode_field`` allocates per value of the field, at most (see each codec's ``unscaled``)
    work_bytes: int

    def __init__(self, fields: Fields):
        super().__init__(fields)
        self.row_bytes = 4 * len(fields) + self.value_bytes(self.row_elems)

    #: encode returns new bytes, never a view of its input: the writer may hand it a reused float32
    #: staging buffer to overwrite (``overwrite=True``) instead of a copy of the rows
    copies = True

    def working_copy(self, rows: torch.Tensor, overwrite: bool) -> torch.Tensor:
        """The float32 rows encode may change in place: ``rows`` themselves with ``overwrite`` (which
        must then be float32), else a contiguous float32 copy (the same bytes for any input layout)."""
        x = rows.detach()
        if not overwrite:
            return x.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        if x.dtype != torch.float32:
            raise TypeError(f"{self.name} encode(overwrite=True) needs float32 rows, got {x.dtype}")
        return x

    def refuse_nonfinite(self, bad: torch.Tensor) -> None:
        """Raise ``NonFiniteRows`` for the first field with a non-finite scale (``bad``: (B, F) bool,
        already known to hold a True)."""
        f = int(bad.any(0).nonzero()[0])
        raise NonFiniteRows(bad[:, f].nonzero().flatten().tolist(), self.fields[f], self.name)

    def with_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """(B, row_bytes) uint8 output rows on the scales' device, their first 4F bytes the scales."""
        out = torch.empty(len(scales), self.row_bytes, dtype=torch.uint8, device=scales.device)
        out[:, : 4 * len(self.fields)].copy_(scales.contiguous().view(torch.uint8))
        return out

    def decode(self, raw: np.ndarray) -> torch.Tensor:
        """(k, row_bytes) uint8 -> (k, row_elems) float32 x̂ = unscaled value · its field's scale (new):
        the whole row's values unpacked at once, then each field scaled in place."""
        scales = self.scales_of(raw, 0, len(self.fields))
        out = self.unscaled(raw[:, 4 * len(self.fields) :], 0, self.row_elems)
        for j, (o, s) in enumerate(zip(self.offsets, self.sizes)):
            out[:, o : o + s].mul_(scales[:, j : j + 1])
        return out

    def scales_of(self, raw: np.ndarray, first: int, end: int) -> torch.Tensor:
        """(k, row_bytes) uint8 -> (k, end - first) float32 scales of fields [first, end) (a copy)."""
        # a copy, not ascontiguousarray: one row sliced from the map counts as contiguous but keeps the
        # row stride (row_bytes, not always a multiple of 4), which torch refuses for float32
        return torch.from_numpy(raw[:, 4 * first : 4 * end].copy().view(np.float32))

    def value_span(self, f: int) -> Tuple[int, int, int]:
        """(first byte, end byte, values to skip): field ``f``'s values are the ``sizes[f]`` values after
        the first ``skip`` of value bytes [first, end) (counted from the end of the scales)."""
        first = self.offsets[f] // self.per_byte
        return first, self.value_bytes(self.offsets[f] + self.sizes[f]), self.offsets[f] - first * self.per_byte

    def decode_field(self, raw: np.ndarray, f: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(k, row_bytes) uint8 -> field ``f``'s (k, n_f) x̂ = unscaled value · scale_f, from the field's
        scale and value bytes only; into ``out`` (a (k, n_f) tensor of any float dtype) when given, else
        a new float32 tensor. The product is taken in float32, as ``decode`` does, then stored."""
        self.check_field(f)
        nf = 4 * len(self.fields)
        scale = self.scales_of(raw, f, f + 1)
        first, end, skip = self.value_span(f)
        values = self.unscaled(raw[:, nf + first : nf + end], skip, self.sizes[f])
        if out is None or out.dtype != torch.float32:
            values.mul_(scale)
            return values if out is None else out.copy_(values)
        return torch.mul(values, scale, out=out)

    def read_bytes(self, f: int) -> int:
        """Bytes of a row that ``decode_field(·, f)`` reads: its scale and the bytes holding its values."""
        first, end, _ = self.value_span(f)
        return 4 + end - first

    def value_bytes(self, n: int) -> int:
        """Bytes holding a row's first ``n`` quantised values."""
        return -(-n // self.per_byte)

    def unscaled(self, raw: np.ndarray, skip: int, n: int) -> torch.Tensor:
        """(k, b) uint8 value bytes -> (k, n) float32 values before the scales (a new tensor): the n
        values after the first ``skip`` values the bytes hold."""
        raise NotImplementedError


class AbsmaxRows(ScaledRows):
    """Rows stored as per-field float32 scales and values quantised to ``levels`` a side (see the
    module docstring); subclasses say how the (B, row_elems) integers q become bytes and back."""

    levels: int

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) float32: max |x| over each field of each row, / levels (0 for an empty field)."""
        cols = [x[:, o : o + s].abs().amax(1) if s else x.new_zeros(len(x)) for o, s in zip(self.offsets, self.sizes)]
        amax = torch.stack(cols, 1) if cols else x.new_zeros(len(x), 0)
        # divided by a tensor: CUDA turns a division by a Python scalar into a product with its
        # rounded reciprocal, which differs from max/levels in the last bit
        return amax / torch.full_like(amax, float(self.levels))

    def encode(self, rows: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """(B, row_elems) values -> (B, row_bytes) uint8: [scales as float32 bytes | packed q], on the
        rows' device. ``overwrite=True``: ``rows`` are float32 and may be overwritten (they are divided,
        rounded and clamped in place: the writer's staging buffer); otherwise they are copied first.

        Passes over the values: |x| and its max per field, x / divisor per field (a division by a
        tensor), round, the clamp (only where a scale is subnormal: otherwise it changes nothing), and
        the cast to int8 written straight into the output's value bytes (int4: into an int8 q, then
        packed into them as int16 byte pairs)."""
        x = self.working_copy(rows, overwrite)
        scales = self.scales(x)
        bad = ~torch.isfinite(scales)
        subnormal = (scales > 0) & (scales < torch.finfo(torch.float32).tiny)
        any_bad, any_subnormal = torch.stack([bad.any(), subnormal.any()]).tolist()  # one sync on a GPU
        if any_bad:
            self.refuse_nonfinite(bad)
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
        for j, (o, s) in enumerate(zip(self.offsets, self.sizes)):
            x[:, o : o + s].div_(divisor[:, j : j + 1])
        x.round_()
        # The clamp changes nothing unless a scale is subnormal: a normal scale = (m / L)(1 + d) with
        # |d| <= 2^-24 (m = the field's max |x|), so |x| / scale <= m / scale, rounded, <= L (1 + 2^-22)
        # < L + 1/2, and rounds to at most L (a zero scale divides by 1 values |x| <= L·2^-150: q = 0).
        # A subnormal scale's relative error is up to 1/2 (m = 190·2^-149: scale 2^-149, m / scale 190).
        if any_subnormal:
            x.clamp_(-self.levels, self.levels)
        out = self.with_scales(scales)
        self.pack_into(x, out[:, 4 * len(self.fields) :])
        return out

    def unscaled(self, raw: np.ndarray, skip: int, n: int) -> torch.Tensor:
        """q as float32: decoding gives x̂ = q · scale."""
        return self.unpack(raw, skip, n).to(torch.float32)

    def pack_into(self, q: torch.Tensor, dest: torch.Tensor) -> None:
        """Write (B, row_elems) q — float32 holding integers in [-levels, levels] — into ``dest``, a
        (B, value_bytes) uint8 view (the value bytes of the output rows), on q's device."""
        raise NotImplementedError

    def unpack(self, raw: np.ndarray, skip: int, n: int) -> torch.Tensor:
        """(k, b) uint8 value bytes -> (k, n) int8 q: the n values after the first ``skip`` the bytes hold."""
        raise NotImplementedError


class Int8Rows(AbsmaxRows):
    """q in [-127, 127], one int8 byte each."""

    name, levels, per_byte = "int8", 127, 1
    #: the float32 q (the int8 q are a view of the map)
    work_bytes = 4

    def pack_into(self, q: torch.Tensor, dest: torch.Tensor) -> None:
        dest.view(torch.int8).copy_(q)  # the cast of an integral float32 to int8 is exact

    def unpack(self, raw: np.ndarray, skip: int, n: int) -> torch.Tensor:
        return torch.from_numpy(raw.view(np.int8))[:, skip : skip + n]


class Int4Rows(AbsmaxRows):
    """q in [-7, 7], two 4-bit two's complement nibbles a byte, low nibble first, over the whole row."""

    name, levels, per_byte = "int4", 7, 2
    #: the nibbles (1 a value, then the int8 q in place), the low/high halves taken from the bytes
    #: (1/2 each) while they are written, and the float32 q (4): at most 1 + 4 at once
    work_bytes = 5

    def pack_into(self, q: torch.Tensor, dest: torch.Tensor) -> None:
        # q's two's complement bytes b (an odd row padded with a 0 byte): byte k of the output is
        # (b[2k] & 0x0F) | (b[2k+1] & 0x0F) << 4
        n, width = q.shape[1], 2 * dest.shape[1]
        if not width * len(q):
            return
        b = torch.empty(len(q), width, dtype=torch.int8, device=q.device)
        if width > n:
            b[:, n:] = 0
        b[:, :n].copy_(q)
        if _LITTLE_ENDIAN:  # each pair of bytes as one int16 w = b[2k] + 256·b[2k+1] (mod 2¹⁶), contiguous
            w = b.view(torch.int16)
            high = (w >> 4).bitwise_and_(0xF0)  # b[2k+1]'s low nibble, as bits 4..7
            dest.copy_(w.bitwise_and_(0x0F).bitwise_or_(high))  # values 0..255: the cast to uint8 is exact
        else:  # strided byte by byte (the same bytes, slower)
            u = b.view(torch.uint8)
            torch.bitwise_left_shift(u[:, 1::2], 4, out=dest)  # uint8 shift, mod 256: the low nibble moved up
            dest.bitwise_or_(u[:, 0::2] & 0x0F)

    def unpack(self, raw: np.ndarray, skip: int, n: int) -> torch.Tensor:
        nib = np.empty((len(raw), 2 * raw.shape[1]), dtype=np.uint8)
        nib[:, 0::2] = raw & 0x0F
        nib[:, 1::2] = raw >> 4
        # sign-extend a 4-bit two's complement nibble in place: 0x0..0x7 -> 0..7, 0x8..0xF -> -8..-1
        # (x ^ 8 is 8..15 for the first, 0..7 for the second; minus 8 in int8 cannot overflow)
        nib ^= 0x08
        q = nib.view(np.int8)
        q -= np.int8(8)
        return torch.from_numpy(q)[:, skip : skip + n]


class Gauss2Rows(ScaledRows):
    """Rows stored as per-field RMS scales and 2-bit Gaussian Lloyd–Max codes (see the module docstring)."""

    name, per_byte = "int2", 4
    #: the codes (1 a value: four shifted quarters, then stacked) with the float32 levels (4), then the
    #: rotation back (analog.storage.rotation): the levels (4), H's output (4) and one Hadamard block's
    #: two factor products (4 + 4) at once, at most
    work_bytes = 16
    #: threshold T and the level of each code c = clamp(⌊z / T⌋, −2, 1) + 2 (Lloyd–Max, N(0, 1), 4 levels)
    threshold = 0.9816
    levels = (-1.5104, -0.4528, 0.4528, 1.5104)

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) float32 σ_f = ‖x_f‖₂ / √n_f per field of each row (0 for an empty or all-zero field;
        non-finite if a value is). A field whose sum of squares overflows float32 or underflows to 0 is
        recomputed as m·‖x_f / m‖₂ / √n_f with m = max |x_f|."""
        out = x.new_zeros(len(x), len(self.sizes))
        for j, (o, s) in enumerate(zip(self.offsets, self.sizes)):
            if s:
                torch.linalg.vector_norm(x[:, o : o + s], dim=1, out=out[:, j])
                out[:, j].mul_(1.0 / np.sqrt(s))
        over = ~torch.isfinite(out) | (out == 0)
        if bool(over.any()):  # Σx² overflowed or underflowed, or a NaN/Inf value (stays non-finite: refused)
            for j in over.any(0).nonzero().flatten().tolist():
                if not self.sizes[j]:
                    continue  # an empty field: σ 0
                xf = x[:, self.offsets[j] : self.offsets[j] + self.sizes[j]]
                m = xf.abs().amax(1, keepdim=True)
                safe = torch.where(m > 0, m, torch.ones_like(m))
                rescaled = (m * torch.linalg.vector_norm(xf / safe, dim=1, keepdim=True)).squeeze(1)
                out[:, j] = torch.where(over[:, j], rescaled / np.sqrt(self.sizes[j]), out[:, j])
        return out

    #: store.json of an int2 store says which rotation its codes are taken after (analog.storage.rotation);
    #: a store without it was written unrotated by an earlier analog and is refused (analog.storage.layout)
    header = {"rotation": "hadamard-v1"}
    header_missing = "before 2026-12-06, int2 codes were not rotated"

    def __init__(self, fields: Fields):
        super().__init__(fields)
        self.rotations = [Rotation(s) if s else None for s in self.sizes]

    def encode(self, rows: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """(B, row_elems) values -> (B, row_bytes) uint8: [σ as float32 bytes | packed codes of R x], on
        the rows' device. ``overwrite=True``: ``rows`` are float32 and may be overwritten (the code is
        computed in place: the writer's staging buffer); otherwise they are copied first.

        Passes over the values: the rotation R of each field (a gather, a sign product and the Hadamard
        factors), ‖x‖ per field, x · r per field, clamp to [−2, 1], floor, and the packing as one product
        with (1, 4, 16, 64) per four values (then + 170 and the cast to uint8, on a quarter of the values).
        All float passes: no comparison masks, no bit shifts."""
        x = self.working_copy(rows, overwrite)
        for rotation, o, s in zip(self.rotations, self.offsets, self.sizes):
            if rotation is not None and len(x):
                x[:, o : o + s] = rotation.forward(x[:, o : o + s])
        scales = self.scales(x)
        bad = ~torch.isfinite(scales)
        if bool(bad.any()):
            self.refuse_nonfinite(bad)
        n, nf = self.row_elems, 4 * len(self.fields)
        out = self.with_scales(scales)
        if not n * len(x):
            return out
        cut = scales * self.threshold
        # r = 1 / (T·σ) as a tensor division (see AbsmaxRows.scales on CUDA's scalar division)
        r = torch.where(cut > 0, torch.ones_like(cut) / torch.where(cut > 0, cut, torch.ones_like(cut)),
                        torch.zeros_like(cut))
        for j, (o, s) in enumerate(zip(self.offsets, self.sizes)):
            x[:, o : o + s].mul_(r[:, j : j + 1])
        x.clamp_(-2.0, 1.0).floor_()  # f = c − 2 ∈ {−2, −1, 0, 1} (a −0.0 floors to −0.0: code 2)
        width = 4 * (self.row_bytes - nf)
        if width > n:  # pad to whole bytes with code 0 (f = −2): the unused bits are 0
            x = torch.cat([x, x.new_full((len(x), width - n), -2.0)], 1)
        # byte = Σ_i c_i 4^i over its four codes = Σ_i f_i 4^i + 2·(1 + 4 + 16 + 64): exact in float32
        packed = x.reshape(len(x), -1, 4) @ self._powers(x)
        out[:, nf:].copy_(packed.add_(170.0))  # integral floats 0..255: the cast to uint8 is exact
        return out

    def _powers(self, x: torch.Tensor) -> torch.Tensor:
        """(4,) the place values 4^i of the four codes of a byte (small integers: exact also under TF32)."""
        return torch.tensor([1.0, 4.0, 16.0, 64.0], dtype=x.dtype, device=x.device)

    def decode(self, raw: np.ndarray) -> torch.Tensor:
        """(k, row_bytes) uint8 -> (k, row_elems) float32 x̂ = R⁻¹(LEVEL[c] · σ) per field (new)."""
        out = super().decode(raw)
        for rotation, o, s in zip(self.rotations, self.offsets, self.sizes):
            if rotation is not None and len(out):
                out[:, o : o + s] = rotation.inverse(out[:, o : o + s])
        return out

    def decode_field(self, raw: np.ndarray, f: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Field ``f`` of k rows, x̂_f = R⁻¹(LEVEL[c_f] · σ_f), from its own bytes (see ScaledRows.decode_field);
        into ``out`` when given, else a new float32 tensor."""
        values = super().decode_field(raw, f)
        if self.rotations[f] is not None and len(values):
            values = self.rotations[f].inverse(values)
        return values if out is None else out.copy_(values)

    def unscaled(self, raw: np.ndarray, skip: int, n: int) -> torch.Tensor:
        """LEVEL[c] per code: decoding gives R⁻¹ of x̂ = LEVEL[c] · σ."""
        codes = np.stack([(raw >> shift) & 0x3 for shift in (0, 2, 4, 6)], 2).reshape(len(raw), 4 * raw.shape[1])
        return torch.from_numpy(np.asarray(self.levels, dtype=np.float32)[codes[:, skip : skip + n]])


_FLOATS = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16),
           "bfloat16": (torch.bfloat16, np.uint16)}
#: the store dtypes (``storage.dtype``), in the order they are offered
_QUANTISED = {"int8": Int8Rows, "int4": Int4Rows, "int2": Gauss2Rows}
STORE_DTYPES: Sequence[str] = (*_FLOATS, *_QUANTISED)
#: the store dtypes whose rows are quantised (their writer refuses non-finite rows)
QUANTISED_DTYPES: Sequence[str] = tuple(_QUANTISED)


def row_codec(dtype: str, fields: Fields):
    """The codec of store dtype ``dtype`` for rows laid out as ``fields``."""
    if dtype in _QUANTISED:
        return _QUANTISED[dtype](fields)
    if dtype in _FLOATS:
        return FloatRows(fields, *_FLOATS[dtype])
    raise ValueError(f"unknown storage dtype {dtype!r}; use one of {list(STORE_DTYPES)}")


def value_dtype(dtype: str) -> torch.dtype:
    """The dtype of the values a store of ``dtype`` holds and returns (int8, int4 and int2 stores: float32)."""
    return row_codec(dtype, []).value_dtype
