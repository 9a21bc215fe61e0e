"""Presence before/after over whole volumes: one run per case, measured without and with presence.

    python Testing/Benchmarks/make_eval_volumes.py DIR --step 3
    python Testing/Benchmarks/bench_presence.py DIR --structures ventricles brain --clip oracle oracle-noisy

The presence step only removes masks after the run (VolumeRunner.judge_presence), so one run
gives both figures: the run with presence off, then decide_presence applied to its records.
Prints per case 3D Dice, HD95, slices painted without target, missed slices, flag recall and
precision (slices with Dice < 0.5), and seconds; LiteMedSAM's real weights on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import time
from pathlib import Path

import numpy as np

from SaLIPSegmentLib.evaluation import measure_run
from SaLIPSegmentLib.io import read_image
from SaLIPSegmentLib.models import create_scorer, create_segmenter, resolve_device
from SaLIPSegmentLib.models.registry import get_segmenter_spec
from SaLIPSegmentLib.settings import PresenceSettings, ProposalSettings, VolumeSettings
from SaLIPSegmentLib.volume import decide_presence, flag_slices, segment_volume

COLUMNS = ("dice_volume", "hd95_mm", "painted_without_target", "missed_slices", "poor_slices", "flagged_slices",
           "flag_recall", "flag_precision", "seconds")


def with_presence(result, rules: PresenceSettings):
    """A copy of a run's result as if judge_presence had run (it costs no model call)."""
    after = copy.deepcopy(result)
    slices = np.moveaxis(after.mask, after.axis, 0)  # a view: clearing a slice clears the mask
    for record in after.slices:
        record.flags = []
    for index, why in decide_presence(after.slices, rules).items():
        record = next(r for r in after.slices if r.index == index)
        slices[index] = False
        record.area, record.absent, record.reason = 0, why, "target absent"
    flag_slices(after.slices, slices[slice(*after.slice_range)])  # the masks as presence left them
    return after


def run_case(folder: Path, structure: str, clip: str, mode: str, segmenter, rules: PresenceSettings,
             keep: Path = None) -> dict:
    """The case's figures without and with presence; `keep` holds the run (a pickle) to re-judge without models."""
    image = read_image(folder / "t1.nii.gz")
    reference = read_image(folder / f"{structure}.nii.gz").array > 0
    if keep is not None and keep.is_file():
        result, seconds = pickle.loads(keep.read_bytes())
    else:
        proposal = ProposalSettings.from_dict(dict(get_segmenter_spec("litemedsam").proposal_defaults))
        started = time.perf_counter()
        result = segment_volume(image.array, segmenter, create_scorer(clip), [structure],
                                VolumeSettings(axis=0, mode=mode, proposal=proposal), reference=reference)
        seconds = time.perf_counter() - started
        if keep is not None:
            keep.write_bytes(pickle.dumps((result, seconds)))
    rows = {}
    for name, run in (("before", result), ("after", with_presence(result, rules))):
        figures = measure_run(run, reference, image.spacing_kji).to_dict()
        rows[name] = {k: figures[k] for k in COLUMNS}
        rows[name]["seconds"] = round(seconds, 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--structures", nargs="+", default=["ventricles", "brain"])
    parser.add_argument("--clip", nargs="+", default=["oracle", "oracle-noisy"])
    parser.add_argument("--mode", default="propagate")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="a folder for the runs: a second call re-judges them at once")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    segmenter = create_segmenter("litemedsam", resolve_device("cpu"))
    rules = PresenceSettings(enabled=True)
    table = {}
    for structure in args.structures:
        for clip in args.clip:
            keep = args.keep / f"{structure}-{clip}-{args.mode}.pickle" if args.keep else None
            rows = run_case(args.folder, structure, clip, args.mode, segmenter, rules, keep)
            table[f"{structure}/{clip}"] = rows
            for name, row in rows.items():
                print(f"{structure:<11} {clip:<13} {args.mode:<11} {name:<7} " + " ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            if args.json:
                args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
