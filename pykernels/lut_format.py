"""The LUT-GEMV weight format: bit planes laid out for table-lookup kernels (T-MAC style).

This module is the single definition of the storage format; the quantizer (``pykernels.lut``),
the CPU, Triton and CUDA kernels and the checkpoint importers all follow it.

Codes
-----
A weight matrix W [N, K] is stored as integer codes q[n, k] in [0, 2**bits) (bits 1..8) plus
per-group parameters along K (group g covers k in [g * gs, (g + 1) * gs)):

* ``"affine"``:    w = scale[n, g] * (q - zero[n, g])          (GPTQ / AWQ; zero in code units)
* ``"symmetric"``: w = scale[n, g] * (q - (2**bits - 1) / 2)   (levels symmetric around 0;
  1 bit gives +-scale/2)
* ``"codebook"``:  w = scale[n, g] * codebook[c, q]             (c = 0 for a per-tensor table,
  c = n for per-channel tables; scale is None when the codebook carries the magnitude)

``scales`` and ``zeros`` are float16 [N, G] (G = K_pad / gs); ``codebook`` is float32
[1 or N, 2**bits]. ``gs`` is the group size (``K_pad`` for per-channel, group_size=-1).

Bit planes
----------
K is padded to ``K_pad``, a multiple of 8 (per-channel) or of the group size (which is itself a
multiple of 8); N is padded to a multiple of ``TILE_N`` = 32 with code 0. Padded columns of x
are zero, padded rows of y are dropped.

``planes`` is uint8 of shape [N_pad / 32, K_pad / 8, bits, 32]. Byte ``planes[t, kk, i, r]``
belongs to row n = 32 t + r and holds bit i of the 8 codes q[n, 8 kk + j], j = 0..7:

    low nibble  = sum_{j<4} bit_i(q[n, 8 kk + j])     << j     (activation group 2 kk)
    high nibble = sum_{j<4} bit_i(q[n, 8 kk + 4 + j]) << j     (activation group 2 kk + 1)

So one 32-byte run is one plane of one 8-wide K slice for 32 consecutive rows: a ``pshufb`` /
``vpermb`` of it against the 16-entry table of an activation group looks up 32 rows at once, and
the 4-bit index of a row is exactly the pattern of its weight bits in that group of 4 k.

Tables (what the kernels compute)
---------------------------------
For a group of 4 activations x0..x3 the kernels build T[idx] = sum_j s_j x_j with
s_j = +1 if bit j of idx is set else -1 (the sign-symmetric form: T[15 - idx] = -T[idx], so 8
entries are computed and 8 negated). With S = x0 + x1 + x2 + x3,
sum_j bit_j x_j = (S + T[idx]) / 2, hence for one scale group

    sum_k q_k x_k = (2**bits - 1) / 2 * S_g + 1/2 * sum_i 2**i * sum_{a in g} T_a[idx_{i,a}]

and ``"symmetric"`` needs only the second term (its zero cancels the first), ``"affine"`` adds
scale * ((2**bits - 1) / 2 - zero) * S_g. ``"codebook"`` is not linear in the bits: kernels
rebuild q from the planes and look the value up in the codebook.
"""
from __future__ import annotations

import torch

TILE_N = 32   # rows per plane run
K_SLICE = 8   # codes per byte column (two activation groups of 4)


def padded_shape(N: int, K: int, group_size: int) -> tuple[int, int, int]:
    """-> (N_pad, K_pad, gs) for a weight [N, K]; group_size -1 means per-channel.

    Raises ValueError naming ``group_size`` when K is not a multiple of it (pad the weight or
    use group_size=-1)."""
    if N < 1 or K < 1:
        raise ValueError(f"weight: expected N >= 1 and K >= 1, got N={N}, K={K}")
    if group_size == -1:
        K_pad = -(-K // K_SLICE) * K_SLICE
        gs = K_pad
    else:
        if not isinstance(group_size, int) or group_size < K_SLICE or group_size % K_SLICE:
            raise ValueError(f"group_size: expected -1 (per-channel) or a positive multiple of "
                             f"{K_SLICE} (e.g. 32, 64, 128), got {group_size!r}")
        if K % group_size:
            raise ValueError(f"group_size: K={K} is not a multiple of group_size={group_size}; "
                             f"pad the weight to {-(-K // group_size) * group_size} columns or use "
                             f"group_size=-1")
        K_pad, gs = K, group_size
    N_pad = -(-N // TILE_N) * TILE_N
    return N_pad, K_pad, gs


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N_pad, K_pad] integers in [0, 2**bits) -> planes uint8 [N_pad/32, K_pad/8, bits, 32].

    N_pad must be a multiple of 32 and K_pad of 8 (see ``padded_shape``)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: expected 1..8, got {bits}")
    N, K = codes.shape
    if N % TILE_N or K % K_SLICE:
        raise ValueError(f"codes: shape {tuple(codes.shape)} must be padded to multiples of "
                         f"({TILE_N}, {K_SLICE})")
    q = codes.to(torch.int32)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise ValueError(f"codes: values must lie in [0, {1 << bits}) for bits={bits}")
    # [N/32, 32, K/8, 2, 4] -> bit i -> nibble -> byte
    q = q.view(N // TILE_N, TILE_N, K // K_SLICE, 2, 4)
    shifts = torch.arange(4, dtype=torch.int32, device=q.device)
    planes = []
    for i in range(bits):
        b = (q >> i) & 1                                     # [T, 32, KK, 2, 4]
        nib = (b << shifts).sum(-1)                          # [T, 32, KK, 2]
        planes.append(nib[..., 0] | (nib[..., 1] << 4))      # [T, 32, KK]
    p = torch.stack(planes, dim=2)                           # [T, 32, bits, KK]
    return p.permute(0, 3, 2, 1).contiguous().to(torch.uint8)  # [T, KK, bits, 32]


def unpack_codes(planes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: planes [T, KK, bits, 32] -> codes uint8 [32 T, 8 KK]."""
    if planes.dim() != 4 or planes.shape[2] != bits or planes.shape[3] != TILE_N:
        raise ValueError(f"planes: expected [N_pad/32, K_pad/8, {bits}, 32], got {tuple(planes.shape)}")
    T, KK = planes.shape[0], planes.shape[1]
    # byte -> its 8 bits (bit j is the plane bit of k = 8 kk + j), via a 256 x 8 table
    table = ((torch.arange(256, dtype=torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1)
    table = table.to(torch.uint8).to(planes.device)
    q = torch.zeros(T, TILE_N, KK, K_SLICE, dtype=torch.uint8, device=planes.device)
    for i in range(bits):
        b = table[planes[:, :, i, :].long()]                 # [T, KK, 32, 8]
        q |= b.permute(0, 2, 1, 3) << i                      # [T, 32, KK, 8]
    return q.reshape(T * TILE_N, KK * K_SLICE)
