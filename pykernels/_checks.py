"""Argument checks shared by the public ops (errors name the argument)."""
from __future__ import annotations

import torch


def check_out(out, shape, like: torch.Tensor) -> None:
    """``out``: a tensor of ``shape`` with ``like``'s dtype and device, else TypeError/ValueError."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    shape = tuple(shape)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out: expected {shape} {like.dtype} on {like.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
