"""Checks of the command line that need no model, run before any model loads.

A wrong range, axis, reference or prompt costs the user a second, not a model load.
This module imports no torch at import time (the device check does, when it runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import InputError, UnknownPresetError
from .settings import parse_slice_range

AXES = ("auto", "0", "1", "2")
# Two grids are the same when they differ by less than this (mm for origins, a fraction for spacings).
GRID_TOLERANCE = 1e-3

CPU_PROFILE_NOTE = ("{where}: using the fast profile (LiteMedSAM + CLIP ViT-B/32, about 3.5 min for 150 "
                    "slices); --profile default runs SAM ViT-B (about 30 min on a CPU).")


def check_axis(text: str) -> str:
    if text not in AXES:
        raise InputError(f"--axis takes 0, 1, 2 or auto, got {text!r}.")
    return text


def check_slicing(axis_text: str, slices: Optional[str], image) -> Tuple[int, Tuple[int, int]]:
    """(numpy axis, slice range) for this image, or the InputError that says what is wrong."""
    from .pipeline import axis_for

    axis = axis_for(check_axis(axis_text), image)
    return axis, parse_slice_range(slices, image.array.shape[axis])


def grid_difference(reference, image) -> Optional[str]:
    """None when two Image3D share a voxel grid, else what differs, in words."""
    if reference.array.shape != image.array.shape:
        return f"its shape is {reference.array.shape}, the input's {image.array.shape} (numpy order k, j, i)"
    spacing_a, spacing_b = np.asarray(reference.spacing), np.asarray(image.spacing)
    if not np.allclose(spacing_a, spacing_b, rtol=GRID_TOLERANCE, atol=0):
        return f"its spacing is {_mm(spacing_a)}, the input's {_mm(spacing_b)}"
    origin_a, origin_b = np.asarray(reference.origin), np.asarray(image.origin)
    if not np.allclose(origin_a, origin_b, rtol=0, atol=GRID_TOLERANCE * float(spacing_b.min()) + 1e-6):
        return f"its origin is {_mm(origin_a)}, the input's {_mm(origin_b)}"
    if not np.allclose(np.asarray(reference.direction), np.asarray(image.direction), atol=GRID_TOLERANCE):
        return "its direction (orientation) differs from the input's"
    return None


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ") mm"


def check_reference(path: Optional[os.PathLike], image, needed_by: str = ""):
    """The reference image, read and checked to lie on the input's grid (voxel for voxel)."""
    from .io import read_image

    if path is None:
        if needed_by:
            raise InputError(f"{needed_by} needs --reference (a mask on the input's grid).")
        return None
    if not Path(path).expanduser().exists():
        raise InputError(f"Reference {path} does not exist.")
    reference = read_image(Path(path))
    difference = grid_difference(reference, image)
    if difference is not None:
        raise InputError(
            f"Reference {path} is not on the input's grid: {difference}. Its voxels would not match the "
            "input's; resample it onto the input first (in Slicer: Resample Image (BRAINS) or Crop Volume; "
            "or SimpleITK's Resample with the input as reference, nearest neighbour)."
        )
    return reference


def check_prompt_spelling(text: Optional[str], free_text: bool = False) -> None:
    """Refuse free text that looks like a misspelt preset ("lugns"): it would run, silently, as words."""
    from .prompts import find_preset, suggest_presets

    if text is None or free_text or find_preset(text) is not None:
        return
    close = suggest_presets(text)
    if close:
        raise UnknownPresetError(
            f"{text!r} is not a preset; did you mean {' or '.join(close)}? "
            "To segment it as free text anyway, add --free-text.")


def has_gpu(device: str) -> bool:
    """Whether --device will run the models on a GPU (CUDA or Apple's MPS)."""
    if device == "cpu":
        return False
    if device != "auto":
        return True
    from .models import resolve_device

    return resolve_device("auto").type != "cpu"


def choose_profile(args) -> Optional[str]:
    """--profile when the user chose none: the fast pair on a machine without a GPU.

    Returns the one line that says so (to be said once the other checks passed), else None.
    """
    if getattr(args, "profile", None) is not None:
        return None
    if args.sam is not None or getattr(args, "engine", "local") == "ray" or has_gpu(args.device):
        args.profile = "default"  # they chose a SAM, or the models run on a cluster's or this GPU
        return None
    args.profile = "fast"
    return CPU_PROFILE_NOTE.format(where="On the CPU (--device cpu)" if args.device == "cpu" else "No GPU here")
