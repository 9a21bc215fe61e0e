"""What the input's direction says about the patient: planes for people, sides for paired organs.

Images are in LPS (SimpleITK's and DICOM's convention): +x points to the patient's left,
+y to the back, +z to the head. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PLANES = ("sagittal", "coronal", "axial")  # slices across x (left-right), y (front-back), z (head-foot)
TISSUE_LEVEL = 0.25
"""Voxels above this fraction of the robust intensity range count as the body when finding its midline."""


def voxel_axis_direction(direction: np.ndarray, numpy_axis: int) -> np.ndarray:
    """The LPS direction in which a numpy axis (k, j, i order) advances."""
    return np.asarray(direction, dtype=float)[:, 2 - numpy_axis]


def anatomical_plane(direction: np.ndarray, numpy_axis: int) -> str:
    """"axial", "coronal" or "sagittal": the plane of the slices cut across this numpy axis."""
    along = np.abs(voxel_axis_direction(direction, numpy_axis))
    return PLANES[int(np.argmax(along))]


@dataclass
class SideResult:
    """What keeping one side did: the side, the body's midline (LPS x, mm) and the voxels removed."""

    side: str
    midline_x_mm: float
    voxels_removed: int

    def to_dict(self) -> dict:
        return {"side": self.side, "midline_x_mm": round(self.midline_x_mm, 2), "voxels_removed": self.voxels_removed}


def _lps_x(indices_kji: np.ndarray, ijk_to_lps: np.ndarray) -> np.ndarray:
    """The LPS x coordinate (mm) of voxels given as rows of (k, j, i)."""
    row = np.asarray(ijk_to_lps, dtype=float)[0]
    return row[3] + indices_kji[:, ::-1] @ row[:3]


def body_midline_x(volume: np.ndarray, ijk_to_lps: np.ndarray, samples: int = 200_000) -> float:
    """The median LPS x of the body's voxels (a strided sample): where left turns into right."""
    step = max(1, int(round((volume.size / samples) ** (1 / 3))))
    sample = volume[::step, ::step, ::step].astype(np.float32)
    low, high = np.percentile(sample, (0.5, 99.5))
    body = np.argwhere(sample > low + TISSUE_LEVEL * (high - low)) * step
    if len(body) == 0:
        body = np.argwhere(np.ones(sample.shape, dtype=bool)) * step
    return float(np.median(_lps_x(body, ijk_to_lps)))


def keep_patient_side(mask: np.ndarray, volume: np.ndarray, ijk_to_lps: np.ndarray, side: str) -> tuple:
    """The mask with every voxel on the other side of the body's midline removed, and a SideResult.

    `mask` and `volume` are in numpy order (k, j, i); `ijk_to_lps` is the 4 x 4 voxel-to-LPS
    matrix (Image3D.ijk_to_lps; in Slicer, IJK-to-RAS with its first two rows negated). A left
    kidney found in the patient's right half is the wrong organ, whatever CLIP scored: it is
    removed rather than returned (its slices then show up as empty in the report).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be left or right, got {side!r}")
    midline = body_midline_x(volume, ijk_to_lps)
    found = np.argwhere(mask)
    x = _lps_x(found, ijk_to_lps)
    wrong = found[(x < midline) if side == "left" else (x > midline)]
    kept = mask.copy()
    kept[tuple(wrong.T)] = False
    return kept, SideResult(side, midline, int(len(wrong)))
