"""Pure-torch LUT-GEMV reference: the test oracle and ``backend="reference"``."""
from __future__ import annotations

import torch


def lut_gemv_reference(x: torch.Tensor, qw) -> torch.Tensor:
    """y = x @ W^T computed in float64 from the dequantized weight, returned in x's dtype.

    x : [K] or [M, K] (any float dtype); qw : pykernels.LUTWeight [N, K]. The weight is
    materialised densely (8 N K bytes in float64), so this is for checking, not for speed.
    """
    w = qw.dequantize(torch.float64)            # [N, K], original column order (perm undone)
    return (x.to(torch.float64) @ w.T).to(x.dtype)
