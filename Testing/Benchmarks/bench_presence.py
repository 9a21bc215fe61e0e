"""Presence before/after over whole volumes: one run per case, measured without and with presence.

    python Testing/Benchmarks/make_eval_volumes.py DIR --step 3
    python Testing/Benchmarks/bench_presence.py DIR --structures ventricles brain --clip oracle oracle-noisy \\
        --modes propagate every-slice --keep RUNS

The presence step only scores each painted slice's final mask once more and removes masks after
the run (VolumeRunner.judge_presence), so one run gives both figures: the run with presence off,
then presence.presence_signal and presence.decide_presence applied to its records here, exactly
as the runner would (same images, same scorer). Prints per case 3D Dice, HD95, slices painted
without target, missed slices, present slices cut by presence, flag recall and precision (slices
with Dice < 0.5), the run's seconds and the presence step's; LiteMedSAM's real weights on the CPU.
`--separation` and `--height` re-judge the kept runs at other rule values (no model call).
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from SaLIPSegmentLib.evaluation import measure_run
from SaLIPSegmentLib.imaging import gray_to_rgb, resize_mask, resize_uint8, window_to_uint8
from SaLIPSegmentLib.io import read_image
from SaLIPSegmentLib.models import create_scorer, create_segmenter, resolve_device
from SaLIPSegmentLib.models.registry import get_segmenter_spec
from SaLIPSegmentLib.presence import candidate_floor, clear_absent, decide_presence, presence_signal
from SaLIPSegmentLib.settings import PresenceSettings, ProposalSettings, VolumeSettings
from SaLIPSegmentLib.volume import flag_slices, segment_volume

COLUMNS = ("dice_volume", "hd95_mm", "painted_without_target", "missed_slices", "poor_slices", "flagged_slices",
           "flag_recall", "flag_precision", "seconds")


def score_presence(result, image: np.ndarray, reference: np.ndarray, scorer, sentences) -> float:
    """Fill each painted record's presence score as VolumeRunner.score_presence does; seconds spent."""
    slices = np.moveaxis(np.asarray(image), result.axis, 0)
    masks = np.moveaxis(result.mask, result.axis, 0)
    references = np.moveaxis(reference, result.axis, 0)
    shape = tuple(result.working_shape)
    started = time.perf_counter()
    for record in result.slices:
        if record.area > 0:
            pixels = resize_uint8(window_to_uint8(slices[record.index], result.window), shape)
            record.presence_score = presence_signal(scorer, gray_to_rgb(pixels),
                                                    resize_mask(masks[record.index], shape), sentences,
                                                    (), resize_mask(references[record.index], shape))
    return time.perf_counter() - started


def with_presence(result, rules: PresenceSettings, thickness_mm=None):
    """A copy of a scored run's result as if judge_presence had run (on slices `thickness_mm` apart)."""
    after = copy.deepcopy(result)
    slices = np.moveaxis(after.mask, after.axis, 0)  # a view: clearing a slice clears the mask
    for record in after.slices:
        record.flags = []
    floor = candidate_floor(after.slices)  # the oracles' scores are plain, not margins
    clear_absent({r.index: r for r in after.slices}, slices, decide_presence(after.slices, rules, floor))
    flag_slices(after.slices, slices[slice(*after.slice_range)], thickness_mm=thickness_mm,  # masks as presence left
                presence_floor=floor)
    return after


def load_or_run(folder: Path, structure: str, clip: str, mode: str, segmenter, keep: Path = None):
    """The run without presence (from `keep` when it was kept), and its seconds: presence is judged here."""
    image = read_image(folder / "t1.nii.gz")
    reference = read_image(folder / f"{structure}.nii.gz").array > 0
    if keep is not None and keep.is_file():
        return pickle.loads(keep.read_bytes())
    proposal = ProposalSettings.from_dict(dict(get_segmenter_spec("litemedsam").proposal_defaults))
    started = time.perf_counter()
    settings = VolumeSettings(axis=0, mode=mode, proposal=proposal, presence=PresenceSettings(enabled=False))
    result = segment_volume(image.array, segmenter(), create_scorer(clip), [structure],
                            settings.for_thickness(image.spacing_kji[0]), reference=reference)
    seconds = time.perf_counter() - started
    if keep is not None:
        keep.write_bytes(pickle.dumps((result, seconds)))
    return result, seconds


def run_case(folder: Path, structure: str, clip: str, mode: str, segmenter, rules_list, keep: Path = None) -> dict:
    """The case's figures without presence and with each rule set."""
    image = read_image(folder / "t1.nii.gz")
    reference = read_image(folder / f"{structure}.nii.gz").array > 0
    result, seconds = load_or_run(folder, structure, clip, mode, segmenter, keep)
    presence_seconds = score_presence(result, image.array, reference, create_scorer(clip), [structure])
    before = measure_run(result, reference, image.spacing_kji).to_dict()
    rows = {"before": {k: before[k] for k in COLUMNS}}
    rows["before"]["seconds"] = round(seconds, 1)
    for rules in rules_list:
        thickness = image.spacing_kji[result.axis]
        figures = measure_run(with_presence(result, rules, thickness), reference, image.spacing_kji).to_dict()
        row = {k: figures[k] for k in COLUMNS}
        row["present_cut"] = figures["missed_slices"] - before["missed_slices"]
        row["seconds"] = round(seconds + presence_seconds, 1)
        row["presence_s"] = round(presence_seconds, 2)
        rows[f"sep{rules.min_separation:g}/h{rules.max_height_outside:g}"] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--structures", nargs="+", default=["ventricles", "brain"])
    parser.add_argument("--clip", nargs="+", default=["oracle", "oracle-noisy"])
    parser.add_argument("--modes", nargs="+", default=["propagate"])
    parser.add_argument("--separation", nargs="+", type=float, default=[PresenceSettings.min_separation])
    parser.add_argument("--height", nargs="+", type=float, default=[PresenceSettings.max_height_outside])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="a folder for the runs: a second call re-judges them at once")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    loaded = []

    def segmenter():  # loaded only when a run is not kept
        if not loaded:
            loaded.append(create_segmenter("litemedsam", resolve_device("cpu")))
        return loaded[0]

    rules_list = [replace(PresenceSettings(enabled=True), min_separation=s, max_height_outside=h)
                  for s in args.separation for h in args.height]
    table = {}
    for mode in args.modes:
        for structure in args.structures:
            for clip in args.clip:
                keep = args.keep / f"{structure}-{clip}-{mode}.pickle" if args.keep else None
                rows = run_case(args.folder, structure, clip, mode, segmenter, rules_list, keep)
                table[f"{structure}/{clip}/{mode}"] = rows
                for name, row in rows.items():
                    print(f"{structure:<11} {clip:<13} {mode:<11} {name:<7} " + " ".join(
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
