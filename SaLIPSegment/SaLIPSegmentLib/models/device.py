"""Device and memory policy: which device, which precision, how many slices per encoder call,
the GPUs batch workers share, and what a run does when a GPU runs out of memory."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, List, Optional, TypeVar

import torch

from ..errors import ModelError
from .catalog import PRECISIONS

if TYPE_CHECKING:  # base imports this module
    from ..settings import ProposalSettings
    from .base import Scorer, Segmenter

T = TypeVar("T")


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




def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The reduced precision the models compute in on `device`; None means full fp32.

    auto: fp16 on CUDA (closer to fp32 than bf16, Testing/Benchmarks/RESULTS.md; an encoding
    that overflows fp16 is redone in fp32), fp32 elsewhere: a CPU runs autocast slower than
    fp32, and MPS autocast is too young to trust with a clinical mask.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, precision: str = "auto"):
    """A context in which model calls run at `precision` (see autocast_dtype)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Slices per image-encoder call; only a GPU batches (on a CPU a batch measured slower per
# image than one at a time: Testing/Benchmarks/RESULTS.md).
GPU_ENCODE_BATCH = 8


def default_encode_batch(device: torch.device) -> int:
    return GPU_ENCODE_BATCH if device.type == "cuda" else 1


def local_gpus(device: str) -> List[str]:
    """cuda:0..N-1 when the device setting lets CUDA be used, else []: one batch worker per GPU."""
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return []
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())]


SMALLEST_BATCH = 4


class MemoryFallback:
    """When a GPU runs out of memory: halve the slices per encoder call, then the prompt and
    crop batches, and redo the step; at the smallest batch, move both models to the CPU and
    go on there. Each step is noted.

    The fallback keeps the batch sizes it decided (`encode_batch`, `proposal`), which the
    runner reads, and tells the models through their own interface (limit_encode_batch,
    limit_batch, to_device).
    """

    def __init__(self, segmenter: Segmenter, scorer: Scorer, proposal: ProposalSettings,
                 forget: Callable[[], None] = lambda: None):
        self.segmenter, self.scorer, self.proposal = segmenter, scorer, proposal
        self.encode_batch = segmenter.encode_batch
        self.forget = forget  # drops what the runner holds on the GPU (slices encoded ahead)
        self.notices: List[str] = []

    def run(self, step: Callable[..., T], *args) -> T:
        """`step(*args)`, redone after each out-of-memory error the fallback can recover from."""
        while True:
            try:
                return step(*args)
            except Exception as error:  # torch raises OutOfMemoryError, MPS a RuntimeError
                if self.recover(error):
                    continue
                if is_out_of_memory(error):
                    raise ModelError(f"Out of memory on the CPU too ({str(error).splitlines()[0]}). Close other "
                                     "programs, choose a smaller model, or segment fewer slices.") from error
                raise

    def recover(self, error: BaseException) -> bool:
        """True when the step is worth another try; False when nothing is left to give up."""
        if not is_out_of_memory(error):
            return False
        self.forget()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self._fewer_slices() or self._smaller_batches() or self._to_cpu()

    def _fewer_slices(self) -> bool:
        if self.encode_batch <= 1:
            return False
        self.encode_batch //= 2
        self.segmenter.limit_encode_batch(self.encode_batch)
        self.notices.append(f"Out of GPU memory: retried encoding {self.encode_batch} slices per call.")
        return True

    def _smaller_batches(self) -> bool:
        batch = self.proposal.points_per_batch
        if batch <= SMALLEST_BATCH:
            return False
        smaller = max(SMALLEST_BATCH, batch // 2)
        self.proposal = replace(self.proposal, points_per_batch=smaller)
        self.scorer.limit_batch(smaller)
        self.notices.append(f"Out of GPU memory: retried with {smaller} prompts and crops per batch.")
        return True

    def _to_cpu(self) -> bool:
        device = self.segmenter.device
        if device is None or torch.device(device).type == "cpu":
            return False
        self.segmenter.to_device(torch.device("cpu"))
        self.scorer.to_device(torch.device("cpu"))
        self.notices.append(f"Out of GPU memory even at {SMALLEST_BATCH} prompts per batch: "
                            "went on on the CPU (slower).")
        return True
