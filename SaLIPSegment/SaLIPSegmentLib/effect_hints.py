"""The Slicer effect's hints after a Preview, without Qt, MRML or torch.

The effect turns a markups ROI, markups points (on and off the target) or a "no target on this
slice" click into a hint on the slice a view shows; this module holds the list, says whether
Update has something to send, builds the engine's correct request (worker.py) and picks the next
slice to fix from the report (hints.rank_slices_to_fix). Everything here is in the numpy order
(k, j, i) of the volume the effect handed the engine, and pixel hints of hints.py's schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .hints import HintGeometry, parse_hint, rank_slices_to_fix, world_to_kji


def slice_box_from_world(corners_world: np.ndarray, ijk_to_world, shape_kji: Sequence[int], axis: int,
                         index: int) -> List[int]:
    """[x0, y0, x1, y1] on slice `index` along numpy `axis`: the in-plane extent of points (an ROI's corners).

    The points are projected along the axis (an ROI drawn in a slice view has some thickness); an
    extent reaching past the slice is clipped to it, one wholly outside is refused (InputError).
    """
    in_plane = np.delete(world_to_kji(corners_world, ijk_to_world), axis, axis=1)  # (row, column) of the slice
    low, high = in_plane.min(axis=0), in_plane.max(axis=0)
    box = [float(low[1]), float(low[0]), float(high[1]), float(high[0])]
    hint = parse_hint({"slice": index, "box": [round(v, 3) for v in box]}, _one_slice(shape_kji, axis, index))
    return list(hint.box)


def _one_slice(shape_kji: Sequence[int], axis: int, index: int) -> HintGeometry:
    """What parse_hint checks a hint on slice `index` against; points pass (HintList knows the model)."""
    rows, columns = [int(s) for s in np.delete(np.asarray(shape_kji), axis)]
    return HintGeometry(axis=axis, slice_range=(index, index + 1), slice_shape=(rows, columns), takes_points=True)


def slice_points_from_world(points_world: np.ndarray, labels: Sequence[int], ijk_to_world, shape_kji: Sequence[int],
                            axis: int, index: int) -> Tuple[List[List[float]], List[int]]:
    """([[x, y], ...], labels): the points that lie on slice `index` along numpy `axis` (within half a
    slice of its centre), in pixels of that slice; a point list placed on other slices is left out,
    and none on this slice is refused (InputError), as is a point off the slice's edge."""
    kji = world_to_kji(points_world, ijk_to_world)
    on_slice = np.abs(kji[:, axis] - index) <= 0.5
    if not on_slice.any():
        raise InputError(f"No point lies on slice {index}: place points on the slice the view shows.")
    in_plane = np.delete(kji[on_slice], axis, axis=1)  # (row, column)
    item = {"slice": index, "points": [[round(float(c), 3), round(float(r), 3)] for r, c in in_plane],
            "labels": [int(v) for v, keep in zip(labels, on_slice) if keep]}
    hint = parse_hint(item, _one_slice(shape_kji, axis, index))
    return [list(p) for p in hint.points], list(hint.labels)


@dataclass
class HintList:
    """The hints of one Preview: what the user set, and what the engine last applied."""

    axis: int
    slice_range: Tuple[int, int]
    shape_kji: Tuple[int, int, int]
    hints: Dict[int, dict] = field(default_factory=dict)
    """Slice index -> the hint's JSON (hints.py's schema, pixel form)."""
    applied: Dict[int, dict] = field(default_factory=dict)
    takes_points: bool = False
    """Whether the run's segmenter takes points (SAM); LiteMedSAM takes boxes only."""
    segmenter_name: str = "this segmenter"

    def _check_slice(self, index: int) -> int:
        start, stop = self.slice_range
        if not start <= index < stop:
            raise InputError(f"Slice {index} is outside the previewed slices {start}:{stop}: move the view onto "
                             "the preview, or Preview those slices first.")
        return int(index)

    def set_box(self, index: int, box: Sequence[float]) -> dict:
        """A box (pixels of the slice) on slice `index`; it replaces any hint there."""
        self.hints[self._check_slice(index)] = {"slice": int(index), "box": [int(v) for v in box]}
        return self.hints[index]

    def set_points(self, index: int, points: Sequence[Sequence[float]], labels: Sequence[int]) -> dict:
        """Points (pixels of the slice) on slice `index`, 1 on the target and 0 off it; they replace any hint there."""
        if not self.takes_points:
            raise InputError(f"{self.segmenter_name} takes boxes only: draw an ROI round the target instead.")
        self.hints[self._check_slice(index)] = {"slice": int(index), "points": [list(map(float, p)) for p in points],
                                                "labels": [int(v) for v in labels]}
        return self.hints[index]

    def set_absent(self, index: int) -> dict:
        """No target on slice `index`."""
        self.hints[self._check_slice(index)] = {"slice": int(index), "absent": True}
        return self.hints[index]

    def remove(self, index: int) -> None:
        self.hints.pop(int(index), None)

    @property
    def pending(self) -> bool:
        """Whether Update has something to send (a hint added, changed or taken away)."""
        return self.hints != self.applied

    def request(self) -> dict:
        """The engine's correct request: every hint now in force."""
        return {"type": "correct", "hints": [self.hints[k] for k in sorted(self.hints)]}

    def mark_applied(self) -> None:
        self.applied = {k: dict(v) for k, v in self.hints.items()}

    def labels(self) -> List[Tuple[int, str]]:
        """(slice, text) for the panel's list, in slice order."""
        def text(hint: dict) -> str:
            if hint.get("absent"):
                return "no target"
            if "points" in hint:
                off = hint["labels"].count(0)
                return f"{len(hint['points'])} points" + (f" ({off} off the target)" if off else "")
            x0, y0, x1, y1 = hint["box"]
            return f"box {x1 - x0 + 1} x {y1 - y0 + 1} px"

        return [(k, f"Slice {k}: {text(self.hints[k])}" + ("" if self.applied.get(k) == self.hints[k] else " (new)"))
                for k in sorted(self.hints)]


def next_slice_to_fix(report: dict, hints: Optional[HintList] = None) -> Optional[int]:
    """The slice the QA ranks worst in a report that has no hint yet, or None."""
    taken = set(hints.hints) if hints is not None else set()
    ranked = [k for k in rank_slices_to_fix(report.get("slices") or []) if k not in taken]
    return ranked[0] if ranked else None
