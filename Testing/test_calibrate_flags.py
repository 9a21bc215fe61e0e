"""The flag judge (Testing/Benchmarks/calibrate_flags.py) on a run `salip segment` wrote: LiteMedSAM's
real weights and the oracle on the real MNI152 template's top, where the brain ends inside the range.
It must judge the product's own flags (reproduce the report's) against Dice it does not fake."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TOOL = Path(__file__).resolve().parent / "Benchmarks" / "calibrate_flags.py"
SLICES = (145, 160)  # the brain ends at 154: its top slices' masks go poor, and the flags say so
# How the product's reasons begin (quality.REASONS), by the name the judge's reason table gives them.
REASON_STARTS = {"solidity": "ragged shape", "area_change": "area jump", "neighbour_dice": "unlike its neighbours",
                 "predicted_iou": "low predicted IoU", "score_z": "low score", "edge": "judged without the target"}


def judge_line(output: str, label: str) -> dict:
    line = next(row for row in output.splitlines() if row.strip().startswith(label))
    return {key: float(value) for key, value in re.findall(r"(\w+) +([\d.]+|nan)", line)}


def slice_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def test_the_judge_reproduces_the_products_flags_and_scores_them_against_dice(tmp_path, mni152):
    volume, reference = mni152
    case = tmp_path / "volumes" / "head"
    case.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(case / "t1.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(reference.astype(np.uint8)), str(case / "brain.nii.gz"))
    keep = tmp_path / "runs"
    common = [str(tmp_path / "volumes"), "--keep", str(keep)]
    ran = subprocess.run([sys.executable, str(TOOL), "run", *common, "--cases", "head/brain", "--clip", "oracle",
                          "--slices", f"{SLICES[0]}:{SLICES[1]}"], capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    folder = keep / "head_brain~oracle"
    report = json.loads((folder / "report.json").read_text())
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "seg.seg.nrrd"))) > 0

    start, stop = SLICES
    poor = np.array([slice_dice(written[k], reference[k] > 0) < 0.5 for k in range(start, stop)])
    rows = sorted(report["slices"], key=lambda row: row["index"])
    flagged = np.array([bool(row["flags"]) for row in rows])
    assert flagged.size == poor.size and flagged.any()

    judged = subprocess.run([sys.executable, str(TOOL), "judge", *common, "--sweep", "min_solidity=0,1.01"],
                            capture_output=True, text=True, timeout=300)
    assert judged.returncode == 0, judged.stderr[-3000:]
    assert "warning" not in judged.stdout  # the report's flags, reproduced from its records and mask
    row = judge_line(judged.stdout, folder.name)
    assert (row["poor"], row["flagged"]) == (poor.sum(), flagged.sum())
    met = re.search(r"target met \(recall >= 0.70, precision >= 0.50\): (\d) of (\d) runs", judged.stdout)
    assert met, judged.stdout
    if poor.any():
        recall, precision = np.sum(poor & flagged) / poor.sum(), np.sum(poor & flagged) / flagged.sum()
        assert row["recall"] == round(recall, 2)
        assert met.groups() == (str(int(recall >= 0.7 and precision >= 0.5)), "1")
    table = judged.stdout.split("alone:")[1].split("min_solidity")[0]
    for kind, start in REASON_STARTS.items():  # each reason's flags on poor and on good slices
        named = [any(flag.startswith(start) for flag in row["flags"]) for row in rows]
        counts = [sum(1 for has, bad in zip(named, poor) if has and bad == side) for side in (True, False)]
        if sum(counts):
            assert re.search(rf"\b{kind} +{counts[0]} +{counts[1]} ", table), (kind, counts, table)

    # A solidity limit above 1 flags every slice with a mask: the swept rule reaches the product's rule.
    swept = judged.stdout.split("min_solidity = 1.01")[1]
    masked = sum(1 for row in report["slices"] if row["area"] > 0 and not row["absent"])
    assert judge_line(swept, "all runs")["flagged"] >= masked > 0
