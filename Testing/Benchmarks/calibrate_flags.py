"""Calibrate the per-slice QA flags (quality.py) against per-slice Dice, offline.

    python Testing/Benchmarks/calibrate_flags.py run /work/evalvols --keep RUNS [--steps step3 step2]
    python Testing/Benchmarks/calibrate_flags.py judge /work/evalvols --keep RUNS

`run` segments each case once (volume folder x structure x scorer x mode; LiteMedSAM's real
weights on the CPU) and keeps it as a pickle (the VolumeResult: records and mask). `judge`
needs no model: it re-measures the quality signals on the kept masks, fits the flag rule on
some cases and prints recall and precision of the flags against slices with Dice < 0.5, per
case and overall, for the fitted cases and for held-out ones (leave one structure out).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import pickle
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from SaLIPSegmentLib.evaluation import POOR_SLICE_DICE
from SaLIPSegmentLib.imaging import dice
from SaLIPSegmentLib.io import read_image
from SaLIPSegmentLib.models import create_scorer, create_segmenter, resolve_device
from SaLIPSegmentLib.models.registry import get_segmenter_spec
from SaLIPSegmentLib.quality import QualityRules, flag_records
from SaLIPSegmentLib.settings import ProposalSettings, VolumeSettings
from SaLIPSegmentLib.volume import SliceRecord, segment_volume

STRUCTURES = ("brain", "deep_grey", "ventricles")
SCORERS = ("oracle", "oracle-noisy")
MODES = ("propagate", "every-slice")


def case_name(step: str, structure: str, clip: str, mode: str) -> str:
    return f"{step}-{structure}-{clip}-{mode}"


def run_case(folder: Path, structure: str, clip: str, mode: str, segmenter, keep: Path) -> None:
    """Segment one case with the product's defaults (but the given mode) and keep (result, seconds)."""
    image = read_image(folder / "t1.nii.gz")
    reference = read_image(folder / f"{structure}.nii.gz").array > 0
    proposal = ProposalSettings.from_dict(dict(get_segmenter_spec("litemedsam").proposal_defaults))
    started = time.perf_counter()
    result = segment_volume(image.array, segmenter, create_scorer(clip), [structure],
                            VolumeSettings(axis=0, mode=mode, proposal=proposal), reference=reference)
    seconds = time.perf_counter() - started
    keep.write_bytes(pickle.dumps((result, seconds)))
    print(f"kept {keep.name}: {seconds:.0f} s", flush=True)


def run_all(args) -> None:
    segmenter = create_segmenter("litemedsam", resolve_device("cpu"))
    for mode in args.modes:
        for step in args.steps:
            for structure in args.structures:
                for clip in args.clip:
                    keep = args.keep / f"{case_name(step, structure, clip, mode)}.pickle"
                    if not keep.is_file():
                        run_case(args.root / step, structure, clip, mode, segmenter, keep)


# -- judging kept runs without models ----------------------------------------------------------

# Each rule's candidate limits; the first of each is "off" (it never fires).
GRID = {
    "max_fragments": [np.inf, 1, 2, 3, 4, 6],
    "min_solidity": [0.0] + [round(v, 2) for v in np.arange(0.3, 0.91, 0.05)],
    # Only key slices have it, and few of them are good here: capped so that a good run's key slices
    # (every slice in every-slice mode, unmeasured here) are not all flagged.
    "min_agreement": [0.0, 0.3, 0.4, 0.5, 0.6, 0.7],
    "min_neighbour_dice": [0.0] + [round(v, 2) for v in np.arange(0.2, 0.91, 0.05)],
    "max_area_change": [np.inf, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0],
    "min_predicted_iou": [0.0] + [round(v, 2) for v in np.arange(0.5, 0.96, 0.05)],
    "min_score_z": [-np.inf, -6.0, -5.0, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0],
    "inherit": [False, True],
}
SIGNAL_OF = {"max_fragments": "fragments", "min_solidity": "solidity", "min_agreement": "agreement",
             "min_neighbour_dice": "neighbour_dice", "max_area_change": "area_change",
             "min_predicted_iou": "predicted_iou", "min_score_z": "score_z"}
MIN_PRECISION = 0.6  # the fit's floor, above the target's 0.5 so that held-out cases keep some room
# At most this share of good slices flagged: where a quarter of the slices are poor, 0.2 keeps the precision
# near 0.6 at a recall of 0.9.
MAX_GOOD_FLAGGED = 0.2


@dataclasses.dataclass
class Case:
    """One kept run as a table: per slice its signals, whether it can be flagged, and whether it is poor."""

    name: str
    structure: str
    signals: Dict[str, np.ndarray]
    empty: np.ndarray
    """Segmented (not skipped, not judged absent) but without a mask: always flagged."""
    eligible: np.ndarray
    poor: np.ndarray
    anchor: np.ndarray = None
    """Per slice the position of its chain's anchor where it was propagated, else -1."""
    records: list = None
    masks: np.ndarray = None


def load_case(root: Path, keep: Path) -> Case:
    step, rest = keep.stem.split("-", 1)
    structure = next(s for s in STRUCTURES if rest.startswith(s + "-"))
    result, _ = pickle.loads(keep.read_bytes())
    reference = np.moveaxis(read_image(root / step / f"{structure}.nii.gz").array > 0, result.axis, 0)
    masks = np.moveaxis(result.mask, result.axis, 0)[slice(*result.slice_range)]
    truth = reference[slice(*result.slice_range)]
    records = result.slices
    for record in records:  # runs kept before these fields existed
        for name, value in (("quality", {}), ("confidence", None), ("candidate_agreement", None)):
            record.__dict__.setdefault(name, value)
    flag_records(records, masks)
    names = list(SIGNAL_OF.values())
    signals = {n: np.array([r.quality.get(n, np.nan) for r in records], dtype=float) for n in names}
    eligible = np.array([not r.skipped and not r.absent for r in records])
    position = {r.index: k for k, r in enumerate(records)}
    anchor = np.array([position.get(r.anchor, -1) if r.method == "propagated" and r.area else -1 for r in records])
    return Case(keep.stem, structure, signals, eligible & np.array([r.area == 0 for r in records]), eligible,
                np.array([dice(m, t) < POOR_SLICE_DICE for m, t in zip(masks, truth)]), anchor, records, masks)


def reference_case(root: Path, step: str, structure: str) -> Case:
    """The reference itself as if a run had drawn it: every slice good. Its shape signals (fragments,
    solidity, neighbours) say what a right mask of this structure looks like, so a rule that fires
    on it would flag good slices of a structure like it; a run's own signals (agreement, IoU,
    score) it has not."""
    truth = read_image(root / step / f"{structure}.nii.gz").array > 0
    records = [SliceRecord(index=k, reason=None, area=int(m.sum())) if m.any()
               else SliceRecord(index=k, reason="no reference", method="skipped") for k, m in enumerate(truth)]
    flag_records(records, truth)
    signals = {n: np.array([r.quality.get(n, np.nan) for r in records], dtype=float) for n in SIGNAL_OF.values()}
    eligible = np.array([not r.skipped for r in records])
    return Case(f"{step}-{structure}-reference", structure, signals, np.zeros_like(eligible), eligible,
                np.zeros_like(eligible))


def flagged(case: Case, limits: Dict[str, float]) -> np.ndarray:
    """What QualityRules with these limits flag (quality.judge_slice's rule, vectorised)."""
    hit = case.empty.copy()
    for name, limit in limits.items():
        if name in SIGNAL_OF:
            values = case.signals[SIGNAL_OF[name]]
            with np.errstate(invalid="ignore"):
                hit |= (values > limit) if name.startswith("max") else (values < limit)
    hit &= case.eligible
    if limits.get("inherit") and case.anchor is not None:
        has_anchor = case.anchor >= 0
        own = hit.copy()  # an anchor is a full-cascade slice: flagged by its own signals
        hit[has_anchor] |= own[case.anchor[has_anchor]]
    return hit


def figures(case: Case, hit: np.ndarray) -> Dict[str, float]:
    found = int(np.sum(hit & case.poor))
    return {"poor": int(case.poor.sum()), "flagged": int(hit.sum()), "found": found,
            "recall": found / case.poor.sum() if case.poor.any() else float("nan"),
            "precision": found / hit.sum() if hit.any() else float("nan")}


def objective(cases: List[Case], limits: Dict[str, float]) -> float:
    """Mean recall over the runs, less penalties where the runs' mean precision falls under
    MIN_PRECISION and where more than MAX_GOOD_FLAGGED of the good slices are flagged: the runs'
    good slices pooled (the only ones with a run's own signals: agreement, IoU, score) and the
    references' (per reference, averaged). Each case counts once in the recall, so the volume with
    most slices does not decide alone; the good slices keep a rule from flagging everything where
    most slices are poor, as here."""
    hits = [flagged(c, limits) for c in cases]
    runs = [(c, hit) for c, hit in zip(cases, hits) if c.poor.any()]
    rows = [figures(c, hit) for c, hit in runs]
    recall = np.mean([r["recall"] for r in rows])
    precision = np.mean([1.0 if np.isnan(r["precision"]) else r["precision"] for r in rows])
    run_good = np.concatenate([hit[c.eligible & ~c.poor] for c, hit in runs])
    references = [float(np.mean(hit[c.eligible])) for c, hit in zip(cases, hits) if not c.poor.any()]
    penalty = max(0.0, MIN_PRECISION - precision)
    for false_alarms in (float(np.mean(run_good)) if run_good.size else 0.0,
                         float(np.mean(references)) if references else 0.0):
        penalty += max(0.0, false_alarms - MAX_GOOD_FLAGGED)
    return float(recall - 4.0 * penalty)


def fit(cases: List[Case], passes: int = 3, starts: int = 12) -> Dict[str, float]:
    """Coordinate ascent over GRID from every rule off, from QualityRules' defaults and from
    `starts` random points (seeded): each pass tries each limit of each rule, keeping what raises
    the objective; the best end wins (one start alone gets stuck where two rules trade places)."""
    random = np.random.default_rng(0)
    origins = [{name: values[0] for name, values in GRID.items()},
               {name: getattr(QualityRules(), name) for name in GRID}]
    origins += [{name: values[random.integers(len(values))] for name, values in GRID.items()} for _ in range(starts)]
    ends = []
    for start in origins:
        limits, best = start, objective(cases, start)
        for _, name in itertools.product(range(passes), GRID):
            for value in GRID[name]:
                trial = {**limits, name: value}
                score = objective(cases, trial)
                if score > best + 1e-9:
                    best, limits = score, trial
        ends.append((best, limits))
    return max(ends, key=lambda end: end[0])[1]


def rules_from(limits: Dict[str, float]) -> QualityRules:
    """QualityRules with the fitted limits ("off" as a limit that never fires)."""
    return QualityRules(**{k: v if isinstance(v, bool) else float(v) for k, v in limits.items()})


def report(title: str, cases: List[Case], limits: Dict[str, float]) -> Dict[str, float]:
    print(f"\n{title}", flush=True)
    total = {"poor": 0, "flagged": 0, "found": 0}
    for case in cases:
        hit = flagged(case, limits)
        row = figures(case, hit)
        if not case.poor.any():  # a reference: only false alarms can happen
            good = case.eligible & ~case.poor
            print(f"  {case.name:<42} good {int(good.sum()):>3}  flagged {int(hit.sum()):>3}")
            continue
        for key in total:
            total[key] += row[key]
        print(f"  {case.name:<42} poor {row['poor']:>3}  flagged {row['flagged']:>3}  "
              f"recall {row['recall']:.2f}  precision {row['precision']:.2f}")
    recall = total["found"] / max(1, total["poor"])
    precision = total["found"] / max(1, total["flagged"])
    print(f"  {'overall (pooled)':<42} poor {total['poor']:>3}  flagged {total['flagged']:>3}  "
          f"recall {recall:.2f}  precision {precision:.2f}")
    return {"recall": recall, "precision": precision}


def judge_all(args) -> None:
    cases = [load_case(args.root, keep) for keep in sorted(args.keep.glob(args.pattern))]
    cases += [reference_case(args.root, step, structure) for step in args.steps for structure in args.structures]
    print("cases:", len(cases))
    defaults = {name: getattr(QualityRules(), name) for name in GRID}
    report(f"QualityRules defaults {defaults}", cases, defaults)
    for held_out in sorted({c.structure for c in cases}):
        fitted = fit([c for c in cases if c.structure != held_out])
        print(f"\nfitted without {held_out}: {fitted}")
        report(f"held out: {held_out}", [c for c in cases if c.structure == held_out], fitted)
    fitted = fit(cases)
    report(f"fitted on all: {fitted}", cases, fitted)
    check_same_rule(cases, fitted)


def check_same_rule(cases: List[Case], limits: Dict[str, float]) -> None:
    """The vectorised rule here and quality.flag_records flag the same slices (what the product runs)."""
    rules = rules_from(limits)
    for case in cases:
        if case.records is None:
            continue
        flag_records(case.records, case.masks, rules)
        product = np.array([bool(r.flags) for r in case.records])
        if not np.array_equal(product, flagged(case, limits)):
            raise SystemExit(f"{case.name}: the product's flags differ from the calibrated rule's")
    print("the product's flag_records flags the same slices as the calibrated rule")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "judge"))
    parser.add_argument("root", type=Path, help="a folder of volume folders (make_eval_volumes.py)")
    parser.add_argument("--keep", type=Path, required=True, help="the folder of kept runs (pickles)")
    parser.add_argument("--steps", nargs="+", default=["step3"])
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    parser.add_argument("--clip", nargs="+", default=list(SCORERS))
    parser.add_argument("--modes", nargs="+", default=["propagate"])
    parser.add_argument("--pattern", default="*.pickle", help="which kept runs `judge` reads")
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        run_all(args)
    else:
        judge_all(args)


if __name__ == "__main__":
    main()
