"""Pixel helpers shared by the cascade and the backends: windowing, boxes, crops, Dice, a robust spread.

Pure numpy: no torch, no Slicer, no files.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

Box = Tuple[int, int, int, int]
"""(x0, y0, x1, y1) in pixels, corners inclusive, as segment_anything uses them."""

# Robust window for volumes without a display window: ignores a few outliers
# (metal, hot pixels) that would otherwise flatten the contrast.
ROBUST_PERCENTILES = (0.5, 99.5)


def robust_window(values: np.ndarray) -> Optional[Tuple[float, float]]:
    """Intensity window (low, high) from robust percentiles of the finite values.

    Returns None when there is no usable contrast (no finite value, or all equal).
    """
    finite = np.asarray(values)[np.isfinite(values)]
    if finite.size == 0:
        return None
    if finite.size > 2_000_000:
        # Percentiles of a strided sample are as good and much cheaper on big volumes.
        finite = finite[:: finite.size // 1_000_000]
    low, high = np.percentile(finite, ROBUST_PERCENTILES)
    if not high > low:
        low, high = float(finite.min()), float(finite.max())
    if not high > low:
        return None
    return float(low), float(high)


def window_to_uint8(image: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """Map intensities in [low, high] to 0..255; NaN and -inf become 0, +inf 255."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"window must have high > low, got {window}")
    scaled = (np.asarray(image, dtype=np.float64) - low) * (255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def working_shape(shape: Tuple[int, int], max_side: int) -> Tuple[int, int]:
    """The slice shape the models see: the slice itself, or shrunk so its longer side is max_side."""
    longer = max(shape)
    if longer <= max_side:
        return tuple(shape)
    return tuple(max(1, round(side * max_side / longer)) for side in shape)


def resize_uint8(image: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Shrink a grey uint8 slice by area averaging (no aliasing)."""
    from PIL import Image

    if image.shape == tuple(shape):
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.BOX))


def resize_mask(mask: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Resize a boolean mask by nearest neighbour (up to the slice's size, or down for a reference)."""
    from PIL import Image

    if mask.shape == tuple(shape):
        return mask.astype(bool)
    picture = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(picture.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """H x W uint8 to the H x W x 3 uint8 image that SAM and CLIP expect."""
    return np.repeat(np.asarray(gray, dtype=np.uint8)[:, :, None], 3, axis=2)


def mask_to_box(mask: np.ndarray) -> Optional[Box]:
    """Tight bounding box of a 2D mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def union_box(boxes: Sequence[Box]) -> Box:
    """The smallest box holding every one of `boxes` (inclusive corners)."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def intersect_boxes(box: Box, other: Box) -> Optional[Box]:
    """The part of `box` inside `other` (inclusive corners), or None where they do not overlap."""
    x0, y0, x1, y1 = max(box[0], other[0]), max(box[1], other[1]), min(box[2], other[2]), min(box[3], other[3])
    return (x0, y0, x1, y1) if x0 <= x1 and y0 <= y1 else None


def masked_crop(image_rgb: np.ndarray, mask: np.ndarray, box: Box) -> np.ndarray:
    """The image with everything outside the mask zeroed, cropped to the box.

    This is what CLIP sees of a candidate: its shape and texture, no context.
    """
    x0, y0, x1, y1 = box
    crop = image_rgb[y0 : y1 + 1, x0 : x1 + 1].copy()
    crop[~mask[y0 : y1 + 1, x0 : x1 + 1]] = 0
    return crop


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; two empty masks agree perfectly (1.0)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def robust_spread(values: np.ndarray) -> float:
    """A robust standard deviation (1.4826 x the median absolute deviation); 0 for no values."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return 0.0
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))
