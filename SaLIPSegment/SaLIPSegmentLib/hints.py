"""Hints: what a person says about one slice to fix it (a box, points, or "no target here").

Qt-free and model-free: this module reads and checks hints; corrections.py applies them.

The JSON schema (`salip segment --hints HINTS.json`, the Slicer effect's hint list)::

    {"hints": [
      {"slice": 40, "box": [x0, y0, x1, y1]},
      {"slice": 41, "points": [[x, y], [x, y]], "labels": [1, 0]},
      {"slice": 42, "absent": true},
      {"ras_box": [[R, A, S], [R, A, S]]},
      {"ras_points": [[R, A, S]], "labels": [1]}
    ]}

A top-level list of hints is accepted too. Pixel hints (`box`, `points`) are in pixels of the
slice as the engine takes it: the slice is the volume's numpy array (order k, j, i) cut across
the run's axis, x counts its columns (the last remaining numpy axis) and y its rows; a box's
corners are inclusive. `labels` are 1 (on the target) or 0 (not on it), one per point, all 1 when
left out. RAS hints are in millimetres (Slicer's RAS) and go through the input's geometry
(IJK to RAS); their slice is where the points lie along the axis (`slice`, when also given, must
agree). Points need a segmenter that takes them (SAM); LiteMedSAM takes boxes only. One hint per
slice: a later hint on the same slice replaces an earlier one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError

KINDS = ("box", "points", "absent")
HINT_METHOD = "hint"
"""A hinted slice's `method` in the per-slice table."""
HINT_KEYS = {"slice", "box", "points", "labels", "absent", "ras_box", "ras_points", "note"}


@dataclass(frozen=True)
class Hint:
    """One slice's hint, in pixels of that slice (full size, before any shrinking for the models)."""

    slice: int
    kind: str
    """box, points, or absent ("no target on this slice")."""
    box: Optional[Tuple[int, int, int, int]] = None
    points: Tuple[Tuple[float, float], ...] = ()
    labels: Tuple[int, ...] = ()

    def to_dict(self) -> dict:
        values = {"slice": self.slice}
        if self.kind == "box":
            values["box"] = list(self.box)
        elif self.kind == "points":
            values.update(points=[list(p) for p in self.points], labels=list(self.labels))
        else:
            values["absent"] = True
        return values


@dataclass
class HintGeometry:
    """What checking and converting hints needs to know about the run."""

    axis: int
    slice_range: Tuple[int, int]
    slice_shape: Tuple[int, int]
    """(rows, columns) of one slice."""
    takes_points: bool = False
    segmenter_name: str = "segmenter"
    ijk_to_ras: Optional[np.ndarray] = field(default=None, repr=False)
    """4 x 4, for RAS hints; None where the input has no geometry."""


def load_hints(path: Path, geometry: HintGeometry) -> List[Hint]:
    """Hints from a JSON file, checked against the run (see the module's schema)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"Hints file {path} does not exist.") from None
    except (OSError, ValueError) as error:
        raise InputError(f"Hints file {path} is not readable JSON: {error}") from None
    return parse_hints(data, geometry)


def parse_hints(data, geometry: HintGeometry) -> List[Hint]:
    """Hints from JSON-ready data, each checked; a later hint on a slice replaces an earlier one."""
    items = data.get("hints") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise InputError('Hints must be a list, or an object {"hints": [...]}.')
    by_slice = {}
    for number, item in enumerate(items, start=1):
        try:
            hint = parse_hint(item, geometry)
        except InputError as error:
            raise InputError(f"Hint {number}: {error}") from None
        by_slice[hint.slice] = hint
    return [by_slice[k] for k in sorted(by_slice)]


def parse_hint(item, geometry: HintGeometry) -> Hint:
    """One hint from its JSON object (raises InputError saying what is wrong)."""
    if not isinstance(item, dict):
        raise InputError(f"expected an object, got {item!r}.")
    unknown = set(item) - HINT_KEYS
    if unknown:
        raise InputError(f"unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(HINT_KEYS))}).")
    given = [k for k in ("box", "points", "absent", "ras_box", "ras_points") if k in item]
    if len(given) != 1:
        raise InputError("give exactly one of box, points, absent, ras_box, ras_points.")
    kind = given[0]
    if kind.startswith("ras_"):
        return _ras_hint(item, kind, geometry)
    index = _slice_index(item.get("slice"), geometry)
    if kind == "absent":
        if item["absent"] is not True:
            raise InputError('"absent" must be true (leave the hint out for a slice that has the target).')
        return Hint(slice=index, kind="absent")
    if kind == "box":
        return Hint(slice=index, kind="box", box=_checked_box(item["box"], geometry.slice_shape))
    return _points_hint(index, item["points"], item.get("labels"), geometry)


def _slice_index(value, geometry: HintGeometry) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise InputError(f'"slice" must be a whole number, got {value!r}.')
    start, stop = geometry.slice_range
    if not start <= int(value) < stop:
        raise InputError(f"slice {int(value)} is outside the run's slices {start}:{stop} along axis {geometry.axis}.")
    return int(value)


def _numbers(value, count: Optional[int], what: str) -> List[float]:
    if not isinstance(value, (list, tuple)) or (count is not None and len(value) != count):
        raise InputError(f"{what} must be a list of {count} numbers, got {value!r}.")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value):
        raise InputError(f"{what} must hold finite numbers, got {value!r}.")
    return [float(v) for v in value]


def _checked_box(value, shape: Tuple[int, int]) -> Tuple[int, int, int, int]:
    x0, y0, x1, y1 = _numbers(value, 4, "box [x0, y0, x1, y1]")
    if x1 < x0 or y1 < y0:
        raise InputError(f"box {value} has x1 < x0 or y1 < y0 (corners are [x0, y0, x1, y1]).")
    rows, columns = shape
    if x1 < 0 or y1 < 0 or x0 > columns - 1 or y0 > rows - 1:
        raise InputError(f"box {value} is outside the slice (x 0..{columns - 1}, y 0..{rows - 1}).")
    # A box reaching past an edge is clipped to it: a drag that overshoots still means the same part.
    return (int(round(max(0.0, x0))), int(round(max(0.0, y0))),
            int(round(min(columns - 1.0, x1))), int(round(min(rows - 1.0, y1))))


def _points_hint(index: int, points, labels, geometry: HintGeometry) -> Hint:
    if not geometry.takes_points:
        raise InputError(f"{geometry.segmenter_name} takes boxes only, not points: give a box instead.")
    if not isinstance(points, (list, tuple)) or not points:
        raise InputError("points must be a non-empty list of [x, y].")
    xy = [tuple(_numbers(p, 2, "a point [x, y]")) for p in points]
    rows, columns = geometry.slice_shape
    for x, y in xy:
        if not (0 <= x <= columns - 1 and 0 <= y <= rows - 1):
            raise InputError(f"point [{x:g}, {y:g}] is outside the slice (x 0..{columns - 1}, y 0..{rows - 1}).")
    labels = [1] * len(xy) if labels is None else labels
    if not isinstance(labels, list) or len(labels) != len(xy) or any(v not in (0, 1) or isinstance(v, bool)
                                                                      for v in labels):
        raise InputError(f"labels must be a list of {len(xy)} values 0 or 1, got {labels!r}.")
    if 1 not in labels:
        raise InputError('points need at least one label 1 (on the target); use "absent" for a slice without it.')
    return Hint(slice=index, kind="points", points=tuple(xy), labels=tuple(int(v) for v in labels))


def world_to_kji(points: np.ndarray, ijk_to_world) -> np.ndarray:
    """Points in millimetres (n x 3, RAS or world) as continuous voxel coordinates in numpy order (k, j, i)."""
    world_to_ijk = np.linalg.inv(np.asarray(ijk_to_world, dtype=np.float64))
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return ((world_to_ijk[:3, :3] @ points.T).T + world_to_ijk[:3, 3])[:, ::-1]


def ras_to_slice_pixels(ras_points: Sequence[Sequence[float]], geometry: HintGeometry) -> Tuple[np.ndarray, int]:
    """RAS millimetres to (x, y) pixels of the slice and the slice index they lie on (they must agree)."""
    if geometry.ijk_to_ras is None:
        raise InputError("RAS hints need the input's geometry (IJK to RAS); give pixel hints instead.")
    ras = np.array([_numbers(p, 3, "a RAS point [R, A, S]") for p in ras_points], dtype=np.float64)
    kji = world_to_kji(ras, geometry.ijk_to_ras)
    along = np.round(kji[:, geometry.axis]).astype(int)
    if along.min() != along.max():
        raise InputError(f"the RAS points lie on different slices ({sorted(set(along.tolist()))}) along axis "
                         f"{geometry.axis}: a hint is on one slice.")
    in_plane = np.delete(kji, geometry.axis, axis=1)  # (row, column) of the slice
    return in_plane[:, ::-1], int(along[0])


def _ras_hint(item: dict, kind: str, geometry: HintGeometry) -> Hint:
    value = item[kind]
    if not isinstance(value, list) or not value or (kind == "ras_box" and len(value) != 2):
        raise InputError(f"{kind} must be a list of {'two corners' if kind == 'ras_box' else 'points'} [R, A, S].")
    pixels, index = ras_to_slice_pixels(value, geometry)
    if "slice" in item and _slice_index(item["slice"], geometry) != index:
        raise InputError(f"slice {item['slice']} differs from the slice the RAS points lie on ({index}).")
    _slice_index(index, geometry)
    if kind == "ras_box":
        (xa, ya), (xb, yb) = pixels
        return Hint(slice=index, kind="box", box=_checked_box([min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)],
                                                              geometry.slice_shape))
    return _points_hint(index, [list(p) for p in pixels], item.get("labels"), geometry)


def hints_to_json(hints: Sequence[Hint]) -> dict:
    """The hints as the schema's JSON object (pixel form)."""
    return {"hints": [h.to_dict() for h in hints]}


def _field(row, name, default=None):
    """A per-slice row's field, whether it is a SliceRecord or its JSON (the report's, in the effect)."""
    return row.get(name, default) if isinstance(row, dict) else getattr(row, name, default)


def rank_slices_to_fix(rows: Sequence) -> List[int]:
    """Slice indices, the one a person should fix first first, from what the run shows (no labels).

    Flagged slices first, then the others; within each, the most pixels likely wrong first: the
    lack of confidence (1 - quality.py's confidence; a flagged slice without a mask counts as 0)
    times the slice's mask area (without a mask, the nearest mask's over the distance to it: the size
    of what may be missing there, and a box next to the kept run carries into the slices past it,
    where one deep in a cut stretch left an island; RESULTS.md, issue 18, tail flags). A small end
    slice fixed first changed a brain's 3D Dice by 0.001; a large poor one by 0.06 (RESULTS.md, issue
    19). The least confident, then the lowest retrieval score, break ties; slices already hinted, or
    skipped or judged absent without a flag, are not offered. `rows` are SliceRecords or the report's
    rows. The one place the ranking lives.
    """
    def offered(row) -> bool:
        skipped = _field(row, "method") == "skipped"
        unflagged = not _field(row, "flags")
        return _field(row, "method") != HINT_METHOD and not ((skipped or _field(row, "absent")) and unflagged)

    painted = [(int(_field(row, "index")), _field(row, "area")) for row in rows if _field(row, "area")]

    def size(row) -> float:
        area = _field(row, "area") or 0
        if area or not painted:
            return float(area)
        index = int(_field(row, "index"))
        nearest, area = min(painted, key=lambda item: (abs(item[0] - index), item[0]))
        return float(area) / abs(nearest - index)

    def urgency(row):
        flagged = bool(_field(row, "flags"))
        confidence = _field(row, "confidence")
        if confidence is None:
            confidence = 0.0 if flagged else 1.0
        scores = _field(row, "clip_scores") or []
        return (not flagged, -(1.0 - confidence) * size(row), confidence, min(scores) if scores else float("inf"),
                _field(row, "index"))

    return [int(_field(row, "index")) for row in sorted(filter(offered, rows), key=urgency)]
