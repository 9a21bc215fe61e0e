"""One volume from settings to mask and report: what `salip segment` and `salip batch` share.

`SegmentSettings` is everything that decides a mask, in a picklable form, so that a
batch worker process or a Ray actor can be handed it and load the models once. It says
the axis and slice range as text ("auto", "A:B"), since they depend on each volume;
`volume_settings` turns it into one volume's `VolumeSettings` (settings.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import numpy as np

from .cleanup import cleaned_run_mask
from .errors import InputError, MissingWeightsError
from .io import Image3D
from .models.base import ProposalSettings
from .prompts import Prompt
from .settings import CleanupSettings, PresenceSettings, PropagationSettings, ShapeSettings, VolumeSettings

ZOOM_FIELDS = ("zoom_factor", "zoom_min_side")
SHAPE_STEPS_OFF = ShapeSettings(unite_parts=False, refine_rounds=0, fill_holes=False, context_padding=0.0,
                                zoom_factor=0.0)


@dataclass(frozen=True)
class SegmentSettings:
    prompt: Prompt
    top_k: int
    sam: str
    clip: str
    proposal: ProposalSettings
    sam_checkpoint: Optional[str] = None
    model_dir: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"
    axis: str = "auto"
    slices: Optional[str] = None
    window: Optional[Tuple[float, float]] = None
    mode: str = "propagate"
    key_interval: int = PropagationSettings.key_interval
    key_distance_mm: Optional[float] = PropagationSettings.key_distance_mm
    adapt: bool = False
    keep_largest: bool = False
    fill_holes: bool = CleanupSettings.fill_holes
    fill_flagged: bool = False
    presence: bool = PresenceSettings.enabled
    shape: ShapeSettings = ShapeSettings()

    def describe(self) -> dict:
        """The settings as JSON-ready values."""
        values = dataclasses.asdict(self)
        values["prompt"] = self.prompt.to_dict()
        return json.loads(json.dumps(values, default=list))

    def fingerprint(self) -> str:
        """SHA256 of what changes the mask; where and how the models run or live does not.

        (A GPU's reduced precision moves a few boundary pixels, as a different GPU would.)
        """
        values = self.describe()
        for where in ("device", "precision", "model_dir"):
            values.pop(where)
        if not values["presence"]:  # off is how masks were made before it existed: old batch folders stay done
            values.pop("presence")
        if self.shape == SHAPE_STEPS_OFF:  # likewise: every step off is how masks were made before they existed
            values.pop("shape")
        elif not self.shape.zoom_factor:  # and zoom off, how they were made before it existed
            for name in ZOOM_FIELDS:
                values["shape"].pop(name)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()

    def volume_settings(self, axis: int, slice_range: Optional[Tuple[int, int]]) -> VolumeSettings:
        """One volume's run, with its axis and slice range resolved (axis_for, volume.parse_slice_range)."""
        return VolumeSettings(
            top_k=self.top_k, axis=axis, slice_range=slice_range, window=self.window, mode=self.mode,
            propagation=PropagationSettings(key_interval=self.key_interval, key_distance_mm=self.key_distance_mm),
            proposal=self.proposal,
            presence=PresenceSettings(enabled=self.presence), shape=self.shape,
            cleanup=CleanupSettings(self.keep_largest, self.fill_holes, self.fill_flagged), adapt=self.adapt,
        )


def settings_from_args(args) -> SegmentSettings:
    """Validated settings from `salip segment`/`salip batch` options; raises InputError early."""
    from .models import get_segmenter_spec
    prompt = prompt_from_args(args)
    top_k = args.top_k if args.top_k is not None else prompt.top_k
    if top_k < 1:
        raise InputError("--top-k must be at least 1.")
    if args.key_interval < 1:
        raise InputError("--key-interval must be at least 1.")
    if args.key_distance < 0:
        raise InputError("--key-distance must be 0 (off) or more millimetres.")
    apply_profile(args)
    return SegmentSettings(
        prompt=prompt, top_k=top_k, sam=args.sam, clip=args.clip,
        proposal=proposal_settings(args, get_segmenter_spec(args.sam)),
        sam_checkpoint=str(args.sam_checkpoint) if args.sam_checkpoint else None,
        model_dir=str(args.model_dir) if args.model_dir else None, device=args.device, precision=args.precision,
        axis=args.axis,
        slices=args.slices, window=tuple(args.window) if args.window else None, mode=args.mode,
        key_interval=args.key_interval, key_distance_mm=args.key_distance or None, adapt=args.adapt,
        keep_largest=args.keep_largest,
        fill_holes=args.fill_holes, fill_flagged=args.fill_flagged, presence=_presence(args),
        shape=shape_settings(args),
    )


def shape_settings(args) -> ShapeSettings:
    """The shape steps (shape.py) from the command line's options; the defaults where none were given."""
    values = {name: getattr(args, name) for name in ("unite_parts", "union_max_gap", "refine_rounds", "fill_part_holes",
                                                     "context_padding", "zoom_factor")
              if getattr(args, name, None) is not None}
    if "fill_part_holes" in values:
        values["fill_holes"] = values.pop("fill_part_holes")
    if min(values.get(name, 0) for name in ("refine_rounds", "context_padding", "union_max_gap", "zoom_factor")) < 0:
        raise InputError("--refine-rounds, --context-padding, --union-max-gap and --zoom-factor must not be negative.")
    return replace(ShapeSettings(), **values)


def _presence(args) -> bool:
    chosen = getattr(args, "presence", None)
    return PresenceSettings.enabled if chosen is None else bool(chosen)


def prompt_from_args(args) -> Prompt:
    from .prompts import get_preset, resolve_prompt

    if args.preset and args.prompt:
        raise InputError("Give either -p/--prompt or --preset, not both.")
    if args.preset:
        return get_preset(args.preset)
    if args.prompt is None:
        raise InputError("Say what to segment with -p PROMPT (a preset name or free text).")
    return resolve_prompt(args.prompt)


def apply_profile(args) -> None:
    """--sam and --clip from --profile where they were not given."""
    from .models.registry import PROFILES

    sam, clip = PROFILES[args.profile]
    args.sam = args.sam or sam
    args.clip = args.clip or clip


def proposal_settings(args, spec) -> ProposalSettings:
    """The segmenter's defaults with the command line's proposal knobs on top."""
    values = dict(spec.proposal_defaults)
    overrides = {
        "points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_thresh, "crop_n_layers": args.crop_layers,
        "max_area_fraction": args.max_area, "min_region_area": args.min_region_area,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ProposalSettings.from_dict(values)


def evaluation_settings(args, top_k: int) -> VolumeSettings:
    """What `salip evaluate` and `salip evaluate-dataset` run with; each volume sets its own axis and range."""
    from .models import get_segmenter_spec

    window = getattr(args, "window", None)  # evaluate-dataset has no --window: each case's own
    return VolumeSettings(top_k=top_k, window=tuple(window) if window else None,
                          proposal=proposal_settings(args, get_segmenter_spec(args.sam)), adapt=args.adapt,
                          presence=PresenceSettings(enabled=_presence(args)), shape=shape_settings(args))


def proposal_variants(volume: np.ndarray, reference: Optional[np.ndarray], segmenter, scorer, sentences,
                      settings: VolumeSettings) -> List[Tuple[str, VolumeSettings]]:
    """("fixed", settings), then, with adaptation on, ("adapted", the same with the adapted proposal)."""
    variants = [("fixed", settings)]
    if settings.adapt:
        from .adaptation import adapt_settings

        adapted, _ = adapt_settings(volume, segmenter, scorer, sentences, settings, reference=reference)
        variants.append(("adapted", replace(settings, proposal=adapted)))
    return variants


def axis_for(text: str, image: Image3D) -> int:
    from .volume import acquisition_axis

    if text == "auto":
        return acquisition_axis(image.spacing_kji, image.array.shape)
    if text not in {"0", "1", "2"}:
        raise InputError(f"--axis takes 0, 1, 2 or auto, got {text!r}.")
    return int(text)


def load_models(sam: str, clip: str, device, sam_checkpoint=None, model_dir=None, progress: bool = True,
                precision: str = "auto"):
    """(segmenter, scorer), or one error that names every missing weights file, not just the first."""
    from .models import create_scorer, create_segmenter

    loaded, missing = [], []
    for load in (
        lambda: create_segmenter(sam, device, sam_checkpoint, model_dir, progress=progress),
        lambda: create_scorer(clip, device, model_dir, progress=progress),
    ):
        try:
            loaded.append(load())
        except MissingWeightsError as error:
            missing.append(str(error))
    if missing:
        raise MissingWeightsError("\n".join(missing))
    for model in loaded:
        model.precision = precision
    return tuple(loaded)


def precision_note(device, precision: str) -> str:
    """' in bf16' (say) where the models compute in reduced precision, else ''."""
    import torch

    from .models.device import autocast_dtype

    dtype = autocast_dtype(device, precision)
    return "" if dtype is None else " in " + {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def keep_prompted_side(mask: np.ndarray, image: Image3D, prompt, say: Callable[[str], None]):
    """(mask, side or None): a left or right preset keeps its side of the body's midline (anatomy.py)."""
    if not prompt.side:
        return mask, None
    from .anatomy import keep_patient_side
    from .volume import as_volume

    mask, side = keep_patient_side(mask, as_volume(image.array), image.ijk_to_lps, prompt.side)
    if side.voxels_removed:
        say(f"Removed {side.voxels_removed} voxels on the patient's other side: "
            f"'{prompt.display_name}' keeps the {side.side} of the body's midline.")
    return mask, side


def segment_image(
    image: Image3D,
    settings: SegmentSettings,
    segmenter,
    scorer,
    *,
    reference: Optional[np.ndarray] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
    say: Callable[[str], None] = lambda text: None,
    hints=None,
    hint_progress: Optional[Callable[[int, int], None]] = None,
    keep: Optional[Callable[[KeptRun], None]] = None,
) -> Tuple[np.ndarray, dict]:
    """The cleaned-up mask on the image's own shape, and the report (per-slice table included).

    `hints` (JSON-ready data in hints.py's schema) correct the automatic pass: each hinted
    slice is segmented from its hint and propagation re-runs around it (corrections.py).
    `progress(done, total)` follows the automatic pass's slices, `hint_progress` the slices the
    hints redo after it.
    `keep` receives the run (a KeptRun) so that correct_kept can correct it later.
    """
    from .volume import as_volume, parse_slice_range, segment_volume

    volume = as_volume(image.array)
    if reference is not None and reference.shape != volume.shape:
        raise InputError(f"The reference has shape {reference.shape}, the input {volume.shape}.")
    axis = axis_for(settings.axis, image)
    run = settings.volume_settings(axis, parse_slice_range(settings.slices, volume.shape[axis]))
    run = run.for_thickness(image.spacing_kji[axis])
    adaptation = None
    if run.adapt:
        from .adaptation import adapt_settings

        proposal, adaptation = adapt_settings(volume, segmenter, scorer, settings.prompt.sentences, run,
                                              reference=reference)
        run = replace(run, proposal=proposal)
        say(f"Adapted proposal settings: IoU >= {proposal.pred_iou_thresh:.2f}, "
            f"stability >= {proposal.stability_score_thresh:.2f}")
    started = time.perf_counter()
    if hints is None and keep is None:
        result = segment_volume(volume, segmenter, scorer, settings.prompt.sentences, run, reference=reference,
                                progress=progress, should_cancel=should_cancel)
        applied = None
    else:
        session, result, applied = run_with_hints(image, volume, segmenter, scorer, settings.prompt.sentences, run,
                                                  hints or [], reference=reference, progress=progress,
                                                  hint_progress=hint_progress, should_cancel=should_cancel)
        if applied:
            say(f"Hints: {len(applied)} slices ({', '.join(str(h['slice']) for h in applied)}) segmented from "
                "their hint and propagated.")
        if keep is not None:
            keep(KeptRun(session, image, settings, run, adaptation))
    return finish_run(image, settings, run, result, adaptation, started, say, applied)


def finish_run(image: Image3D, settings: SegmentSettings, run: VolumeSettings, result, adaptation, started: float,
               say: Callable[[str], None], applied=None) -> Tuple[np.ndarray, dict]:
    """The run's mask after clean-up and laterality, and the report (the hints applied, when there are any)."""
    mask, side = keep_prompted_side(cleaned_run_mask(result, run), image, settings.prompt, say)
    report = {
        "prompt": settings.prompt.to_dict(), "top_k": run.top_k, "sam": settings.sam, "clip": settings.clip,
        "takes_points": result.takes_points, "axis": result.axis, "mode": run.mode,
        "key_interval": run.propagation.key_interval, "key_distance_mm": run.propagation.key_distance_mm,
        "slice_range": list(result.slice_range), "window": list(result.window),
        "proposal": dataclasses.asdict(run.proposal),
        "adaptation": [dataclasses.asdict(row) for row in adaptation] if adaptation else None,
        "cleanup": {**dataclasses.asdict(run.cleanup), "voxels_before": int(result.mask.sum()),
                    "voxels_after": int(mask.sum())},
        "laterality": side.to_dict() if side else None,
        "seconds": round(time.perf_counter() - started, 3),
        "summary": result.summary(), "slices": [s.to_dict() for s in result.slices],
    }
    report["summary"]["voxels"] = int(mask.sum())  # what is written, after clean-up and laterality
    if applied is not None:
        report["hints"] = applied
        report["summary"]["slices_hinted"] = len(applied)
    return mask.reshape(image.array.shape), report


def run_with_hints(image: Image3D, volume: np.ndarray, segmenter, scorer, sentences, run: VolumeSettings, hints,
                   *, reference=None, progress=None, hint_progress=None, should_cancel=None):
    """(the CorrectionSession, its VolumeResult, the hints applied as JSON): the automatic pass, then the hints.

    The hints are checked against the run (slices, slice size, the segmenter's prompts) before any
    model runs, so a bad hints file costs nothing.
    """
    from .corrections import CorrectionSession
    from .hints import parse_hints
    from .io import RAS_TO_LPS

    session = CorrectionSession(volume, segmenter, scorer, sentences, run, reference=reference,
                                progress=progress, should_cancel=should_cancel)
    parsed = parse_hints(hints, session.geometry(RAS_TO_LPS @ image.ijk_to_lps))
    automatic = session.run()
    if not parsed:
        return session, automatic, []
    session.progress = hint_progress  # a correction counts the slices it redoes (corrections._Redo)
    result, _ = session.correct(parsed)
    result.seconds += automatic.seconds
    return session, result, [h.to_dict() for h in parsed]


@dataclass
class KeptRun:
    """A run kept after Preview so that Update corrects it (the Slicer worker): the session and what
    its report needs."""

    session: object
    """corrections.CorrectionSession, with the automatic pass's state saved (automatic_state)."""
    image: Image3D
    settings: SegmentSettings
    run: VolumeSettings
    adaptation: Optional[list] = None


def correct_kept(kept: KeptRun, hints, *, progress=None, should_cancel=None,
                 say: Callable[[str], None] = lambda text: None) -> Tuple[np.ndarray, dict]:
    """The kept run with `hints` (the whole list now in force, in hints.py's schema): mask and report.

    Hints new or changed since the last call are applied incrementally; when one was removed, the
    automatic pass's state comes back first and every hint is applied again (no slice is encoded
    again either way). The report's `correction` says what was redone and what it took. One that
    fails or is stopped (`should_cancel`) leaves the kept run as the last result showed it.
    """
    from .hints import parse_hints
    from .io import RAS_TO_LPS

    session = kept.session
    parsed = parse_hints(hints, session.geometry(RAS_TO_LPS @ kept.image.ijk_to_lps))
    session.progress, session.should_cancel = progress, should_cancel
    shown = session.save_state() if set(session.hints) - {h.slice for h in parsed} else None
    if shown is not None:
        session.restore_state(session.automatic_state)
    started = time.perf_counter()
    try:
        result, correction = session.correct(parsed)  # all or nothing
    except BaseException:
        if shown is not None:  # back to the preview the user sees, not the automatic pass
            session.restore_state(shown)
        raise
    applied = [h.to_dict() for h in session.hints.values()]
    mask, report = finish_run(kept.image, kept.settings, kept.run, result, kept.adaptation, started, say,
                              sorted(applied, key=lambda h: h["slice"]))
    report["correction"] = correction.to_dict()
    return mask, report
