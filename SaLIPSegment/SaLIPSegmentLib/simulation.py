"""Simulated corrections: how fast a user's boxes bring a run to the answer (`salip evaluate --simulate-corrections`).

After the automatic pass a simulated user fixes one slice at a time: the slice the QA ranks worst
(corrections.rank_slices_to_fix: label-free, as a user would see the run), or, for a second curve,
the slice that truly is worst by Dice. The user's hint is the reference's box on that slice, or
"no target" where the reference is empty; then propagation re-runs (CorrectionSession.correct).
Both curves start from the same automatic pass and the same kept embeddings, and every figure
is taken on the mask the user gets (after the run's clean-up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .cleanup import clean_up, cleaned_run_mask
from .corrections import CorrectionSession, rank_slices_to_fix, reference_hint
from .imaging import dice
from .models.base import Scorer, Segmenter
from .settings import VolumeSettings
from .volume import VolumeResult, as_volume

CHOOSERS = ("qa", "worst-dice")


@dataclass
class CorrectionStep:
    """The result after `step` corrections (0: the automatic pass)."""

    step: int
    dice_volume: float
    dice_per_slice: List[float]
    """Per slice of the range, in order; 1.0 where both the reference and the mask are empty."""
    slice: Optional[int] = None
    """The slice fixed at this step."""
    hint: Optional[dict] = None
    seconds: float = 0.0
    """What this correction took (the automatic pass's time at step 0)."""
    changed: List[int] = field(default_factory=list)
    """The slices this correction recomputed (the others kept their voxels)."""
    encodings: int = 0
    """Slices encoded for it (0: every embedding was kept)."""


@dataclass
class SimulatedCorrections:
    """Both curves, and the bound a box on every slice would reach."""

    slice_range: List[int]
    box_bound_dice_volume: float
    """3D Dice of the reference's box refined on every slice (and nothing elsewhere)."""
    box_bound_per_slice: List[float]
    embedding_mib: float
    """Memory the session's kept embeddings hold."""
    curves: Dict[str, List[CorrectionStep]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def shown_slices(result: VolumeResult, settings: VolumeSettings) -> np.ndarray:
    """The run's mask as the user gets it (cleaned up: cleanup.cleaned_run_mask), slices first."""
    return np.moveaxis(as_volume(cleaned_run_mask(result, settings)), result.axis, 0)


def slice_dice(shown: np.ndarray, truth: np.ndarray, slice_range) -> List[float]:
    """Dice per slice of the range (1.0 where both are empty); both masks slices first."""
    return [dice(shown[k], truth[k]) for k in range(*slice_range)]


def volume_dice(shown: np.ndarray, truth: np.ndarray, slice_range) -> float:
    region = slice(*slice_range)
    return dice(shown[region], truth[region])


def worst_by_dice(shown: np.ndarray, truth: np.ndarray, slice_range, hinted) -> Optional[int]:
    """The slice with the lowest Dice (the most wrong pixels on a tie), not yet hinted; None when all are perfect."""
    start = slice_range[0]
    candidates = [(score, -int((shown[start + n] ^ truth[start + n]).sum()), start + n)
                  for n, score in enumerate(slice_dice(shown, truth, slice_range))
                  if start + n not in hinted and score < 1.0]
    return min(candidates)[2] if candidates else None


def choose_slice(chooser: str, result: VolumeResult, shown: np.ndarray, truth: np.ndarray, hinted) -> Optional[int]:
    if chooser == "qa":
        ranked = [k for k in rank_slices_to_fix(result.slices) if k not in hinted]
        return ranked[0] if ranked else None
    return worst_by_dice(shown, truth, result.slice_range, hinted)


def box_bound(session: CorrectionSession, reference: np.ndarray):
    """(3D Dice, per-slice Dice) of the reference's box refined on every slice of the range, cleaned
    up as a run is."""
    truth = np.moveaxis(reference, session.axis, 0)
    bound = np.zeros_like(truth)
    for index in session.tissue:
        hint = reference_hint(truth[index], index)
        if hint.kind == "box":
            bound[index] = session.hint_mask(hint)
    bound = clean_up(bound, session.settings.cleanup, 0, top_k=session.settings.top_k)
    span = (session.start, session.stop)
    return volume_dice(bound, truth, span), slice_dice(bound, truth, span)


def _step(step: int, shown: np.ndarray, truth: np.ndarray, slice_range, **found) -> CorrectionStep:
    """The figures after `step` corrections, on the mask the user gets (shown_slices)."""
    return CorrectionStep(step, volume_dice(shown, truth, slice_range), slice_dice(shown, truth, slice_range), **found)


def _curve(session: CorrectionSession, automatic: VolumeResult, reference: np.ndarray, chooser: str,
           count: int, say: Callable[[str], None]) -> List[CorrectionStep]:
    truth = np.moveaxis(reference, session.axis, 0)
    result, shown = automatic, shown_slices(automatic, session.settings)
    steps = [_step(0, shown, truth, result.slice_range, seconds=automatic.seconds)]
    for step in range(1, count + 1):
        index = choose_slice(chooser, result, shown, truth, set(session.hints))
        if index is None:
            say(f"{chooser}: nothing left to fix after {step - 1} corrections")
            break
        hint = reference_hint(truth[index], index)
        result, correction = session.correct([hint])
        shown = shown_slices(result, session.settings)
        steps.append(_step(step, shown, truth, result.slice_range, slice=index, hint=hint.to_dict(),
                           seconds=correction.seconds, changed=correction.changed, encodings=correction.encodings))
        say(f"{chooser} #{step}: slice {index} ({hint.kind}), Dice {steps[-1].dice_volume:.3f}, "
            f"{correction.seconds:.2f} s, {len(correction.changed)} slices redone")
    return steps


def simulate_corrections(volume: np.ndarray, reference: np.ndarray, segmenter: Segmenter, scorer: Scorer,
                         sentences: Sequence[str], settings: VolumeSettings, count: int, *,
                         choosers: Sequence[str] = CHOOSERS, progress=None,
                         say: Callable[[str], None] = lambda text: None) -> SimulatedCorrections:
    """The automatic pass, then `count` simulated corrections per chooser, from the same start.

    `progress(done, total)` follows the automatic pass; `say` tells each correction as it ends."""
    reference = as_volume(reference).astype(bool)
    session = CorrectionSession(volume, segmenter, scorer, sentences, settings, reference=reference,
                                progress=progress)
    automatic = session.run()
    session.progress = None
    automatic_state = session.automatic_state
    curves = {}
    for chooser in choosers:
        session.restore_state(automatic_state)
        restored = session.result(automatic.seconds)
        curves[chooser] = _curve(session, restored, reference, chooser, count, say)
    session.restore_state(automatic_state)
    bound, bound_per_slice = box_bound(session, reference)
    return SimulatedCorrections(slice_range=[session.start, session.stop], box_bound_dice_volume=bound,
                                box_bound_per_slice=bound_per_slice,
                                embedding_mib=round(session.embedding_bytes / 2**20, 1), curves=curves)
