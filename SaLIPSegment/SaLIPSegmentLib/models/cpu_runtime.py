"""The image encoder and mask decoder on ONNX Runtime, for CPUs: same weights, same outputs, less time.

The encoder is exported once per segmenter, in memory, at the first CPU encoding at full
precision of a job long enough to repay it (Segmenter.expect_encodings). The mask decoder,
the same for SAM and LiteMedSAM, is exported at the first CPU decoding at full precision of
any job. Both give torch's outputs within rounding, in less time (Testing/Benchmarks/RESULTS.md).
Nothing is written to disk, so a read-only model directory and a changed checkpoint need no
care.

ONNX Runtime is optional: where `onnxruntime` or `onnx` cannot be imported (inside Slicer,
unless installed), or an export fails, that part runs in torch as before. SALIP_CPU_RUNTIME
chooses: `onnxruntime` (default, where available) or `torch`.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import warnings
from typing import Callable, Optional, TypeVar

import numpy as np
import torch

from ..errors import ModelError

RUNTIME_VARIABLE = "SALIP_CPU_RUNTIME"
RUNTIMES = ("onnxruntime", "torch")

# The runtime holds its own copy of the weights, and an in-memory ONNX model must stay under
# protobuf's 2 GB: SAM ViT-B (360 MB) and LiteMedSAM qualify, ViT-L (1.2 GB) and ViT-H do not.
MAX_ENCODER_BYTES = 1 << 30

log = logging.getLogger(__name__)
T = TypeVar("T")


def requested_runtime() -> str:
    """The CPU runtime asked for through SALIP_CPU_RUNTIME (onnxruntime unless told otherwise)."""
    value = os.environ.get(RUNTIME_VARIABLE, "onnxruntime").strip().lower() or "onnxruntime"
    if value not in RUNTIMES:
        raise ModelError(f"{RUNTIME_VARIABLE}={value!r}: use one of {', '.join(RUNTIMES)}.")
    return value


# What must import (effect_options.CPU_RUNTIME_REQUIREMENTS offers them inside Slicer).
RUNTIME_MODULES = ("onnxruntime", "onnx")


def onnx_runtime_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in RUNTIME_MODULES)


def _session(module: torch.nn.Module, inputs: tuple, input_names, output_names, threads: int,
             memory_arena: bool, dynamic_axes: Optional[dict] = None):
    """An ONNX Runtime session on the CPU for `module`, traced on `inputs` and exported in memory."""
    import onnxruntime

    buffer = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape checks
        torch.onnx.export(module, tuple(t.float().contiguous() for t in inputs), buffer, input_names=input_names,
                          output_names=output_names, opset_version=17, dynamo=False, dynamic_axes=dynamic_axes)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # The arena re-uses buffers between runs instead of asking the system for fresh pages each
    # time: faster where activations are small, for more memory (Testing/Benchmarks/RESULTS.md).
    options.enable_cpu_mem_arena = memory_arena
    options.enable_mem_pattern = False
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """An image encoder exported to ONNX and run by ONNX Runtime on the CPU, one image per call.

    Exported for a batch of one (the encoders' shape checks are traced as constants);
    batches are encoded image by image, as a CPU encodes them anyway.
    """

    def __init__(self, encoder: torch.nn.Module, example: torch.Tensor, threads: int, memory_arena: bool = False):
        self.session = _session(encoder, (example[:1],), ["pixels"], ["features"], threads, memory_arena)
        self.input_shape = tuple(example.shape[1:])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[1:]) != self.input_shape:
            raise ValueError(f"exported for inputs of shape {self.input_shape}, got {tuple(pixels.shape[1:])}")
        outputs = [self.session.run(None, {"pixels": image[None].float().contiguous().numpy()})[0]
                   for image in pixels]
        return torch.from_numpy(np.concatenate(outputs))


class _AllMasks(torch.nn.Module):
    """segment_anything's mask decoder with every mask output: the caller picks single or multimask."""

    def __init__(self, mask_decoder: torch.nn.Module):
        super().__init__()
        self.mask_decoder = mask_decoder

    def forward(self, features, sparse, dense, image_pe):
        return self.mask_decoder.predict_masks(image_embeddings=features, image_pe=image_pe,
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)


class OnnxMaskDecoder:
    """segment_anything's mask decoder (SAM's and LiteMedSAM's) on ONNX Runtime, for prompts without a mask.

    It always keeps its memory arena: without it, the runtime and torch alike spend most of a
    decoder call paging in fresh memory for the image-sized activations of every prompt. Prompts
    are run at most PROMPTS_PER_RUN at a time: the time per prompt is the same from 4 to 32, the
    arena's memory is not (figures: Testing/Benchmarks/RESULTS.md).
    """

    PROMPTS_PER_RUN = 8

    def __init__(self, mask_decoder: torch.nn.Module, features: torch.Tensor, sparse: torch.Tensor,
                 dense: torch.Tensor, image_pe: torch.Tensor, threads: int):
        # Traced with two prompts so that the prompt count stays a free dimension of the graph.
        example = (features[:1], sparse[:1].expand(2, -1, -1), dense[:1], image_pe)
        self.session = _session(_AllMasks(mask_decoder), example, ["features", "sparse", "dense", "image_pe"],
                                ["masks", "iou"], threads, memory_arena=True,
                                dynamic_axes={"sparse": {0: "prompts", 1: "tokens"}, "masks": {0: "prompts"},
                                              "iou": {0: "prompts"}})

    def __call__(self, features: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                 image_pe: torch.Tensor, multimask: bool):
        """Low-resolution logits (B, M, h, w) and predicted IoU (B, M), as MaskDecoder.forward returns them.

        `dense` is the prompt encoder's no-mask embedding, the same for every prompt: one row is used.
        """
        fixed = {"features": features[:1].float().contiguous().numpy(),
                 "dense": dense[:1].float().contiguous().numpy(),
                 "image_pe": image_pe.float().contiguous().numpy()}
        masks, iou = [], []
        for start in range(0, len(sparse), self.PROMPTS_PER_RUN):
            chunk = sparse[start : start + self.PROMPTS_PER_RUN].float().contiguous().numpy()
            m, i = self.session.run(None, {**fixed, "sparse": chunk})
            masks.append(m)
            iou.append(i)
        chosen = slice(1, None) if multimask else slice(0, 1)  # as MaskDecoder.forward chooses
        return torch.from_numpy(np.concatenate(masks)[:, chosen]), torch.from_numpy(np.concatenate(iou)[:, chosen])


def _runtime_wanted() -> bool:
    return requested_runtime() == "onnxruntime" and onnx_runtime_available()


def _export_or_torch(part: str, export: Callable[[], T]) -> Optional[T]:
    """export(), or None (torch is used) with a warning where the exporter or the runtime fails."""
    try:
        return export()
    except Exception as error:  # any exporter or runtime failure: torch still works
        log.warning("The %s stays in torch: ONNX export failed (%s).", part, error)
        return None


def build_onnx_encoder(encoder: torch.nn.Module, example: torch.Tensor,
                       memory_arena: bool = False) -> Optional[OnnxEncoder]:
    """An OnnxEncoder for `encoder`, or None (torch is used) where it cannot or should not be built."""
    if not _runtime_wanted() or sum(p.numel() * p.element_size() for p in encoder.parameters()) > MAX_ENCODER_BYTES:
        return None
    return _export_or_torch("image encoder",
                            lambda: OnnxEncoder(encoder, example, torch.get_num_threads(), memory_arena))


def build_onnx_mask_decoder(mask_decoder: torch.nn.Module, features: torch.Tensor, sparse: torch.Tensor,
                            dense: torch.Tensor, image_pe: torch.Tensor) -> Optional[OnnxMaskDecoder]:
    """An OnnxMaskDecoder traced on these inputs, or None (torch is used) where it cannot be built."""
    if not _runtime_wanted():
        return None
    return _export_or_torch("mask decoder", lambda: OnnxMaskDecoder(
        mask_decoder, features, sparse, dense, image_pe, torch.get_num_threads()))
