"""The one place that picks the torch device: CUDA, then Apple's MPS, then the CPU."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import ModelError


def resolve_device(requested: Optional[str] = None) -> torch.device:
    """`None`/"auto" picks the best available; an explicit device must exist."""
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as error:
        raise ModelError(f"Unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps.") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("CUDA was requested but no CUDA GPU is available here; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"{requested} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("MPS was requested but is not available here; use --device cpu.")
    return device


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or the RuntimeError other backends (MPS) raise for it."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return "OutOfMemoryError" in names or "out of memory" in str(error).lower()
