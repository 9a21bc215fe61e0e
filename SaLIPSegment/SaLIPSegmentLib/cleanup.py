"""3D clean-up of a run's mask: flagged slices, holes, largest components (CleanupSettings).

cleaned_run_mask takes a run to the mask the user gets; `salip segment`, batch, Slicer, `salip
evaluate` and the simulated corrections all go through it, so what is measured is what is written.
Filling holes enclosed in a slice is on by default: SAM-family models leave bright or dark patches
inside an organ out of its mask (the cortex inside a head with skull), and the organs users prompt
are solid in a slice (figures in Testing/Benchmarks/RESULTS.md). The other steps are off: a
zero-shot mask is what the models said, and a clean-up that removes a second organ part (two lungs,
two kidneys) would be wrong. Numpy only.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy import ndimage

from .settings import CleanupSettings, VolumeSettings


def clean_up(mask: np.ndarray, settings: CleanupSettings, axis: int, *, flagged: Iterable[int] = (),
             top_k: int = 1) -> np.ndarray:
    """The mask after the settings' steps, in this order: flagged slices (`flagged`, slice indices
    along `axis`), holes, the `top_k` largest components. The input is not changed."""
    if settings.fill_flagged:
        mask = fill_from_neighbours(mask, flagged, axis)
    if settings.fill_holes:
        mask = fill_holes_per_slice(mask, axis)
    if settings.keep_largest:
        mask = keep_largest_components(mask, top_k)
    return mask


def cleaned_run_mask(result, settings: VolumeSettings) -> np.ndarray:
    """A run's mask (a volume.VolumeResult) after the run's clean-up, its flagged slices known."""
    return clean_up(result.mask, settings.cleanup, result.axis, flagged=[s.index for s in result.slices if s.flags],
                    top_k=settings.top_k)


def keep_largest_components(mask: np.ndarray, count: int = 1) -> np.ndarray:
    """Keep the `count` largest 3D connected components (26-connected)."""
    labels, found = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if found <= count:
        return mask.copy()
    sizes = ndimage.sum(mask, labels, index=np.arange(1, found + 1))
    keep = np.argsort(-sizes)[:count] + 1
    return np.isin(labels, keep)


def fill_holes_per_slice(mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """Fill holes in every slice along `axis` (a hole is background not connected to the border)."""
    filled = np.moveaxis(mask.copy(), axis, 0)
    for index in range(filled.shape[0]):
        if filled[index].any():
            filled[index] = ndimage.binary_fill_holes(filled[index])
    return np.moveaxis(filled, 0, axis)


def fill_from_neighbours(mask: np.ndarray, slices: Iterable[int], axis: int = 0) -> np.ndarray:
    """Replace each given slice by what both of its neighbours agree on (their intersection).

    For slices a person would not trust (flagged: no candidate, low score, area jump).
    A slice without a segmented neighbour on both sides is left as it is.
    """
    result = np.moveaxis(mask.copy(), axis, 0)
    source = np.moveaxis(mask, axis, 0)
    for index in sorted(set(slices)):
        if 0 < index < result.shape[0] - 1 and source[index - 1].any() and source[index + 1].any():
            result[index] = source[index - 1] & source[index + 1]
    return np.moveaxis(result, 0, axis)
