"""Stage-wise evaluation: HD95 in mm, the stages' Dice, and `salip evaluate` on a real brain."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SaLIPSegmentLib.cli import main
from SaLIPSegmentLib.evaluation import evaluate_modes, evaluate_volume, hd95, measure_run
from SaLIPSegmentLib.models import OracleScorer, ProposalSettings, create_segmenter
from SaLIPSegmentLib.settings import VolumeSettings
from SaLIPSegmentLib.volume import SliceRecord, VolumeResult

from conftest import TINY_SAM_PROPOSALS, disk_image


def test_hd95_measures_in_millimetres_along_the_right_axes():
    a = np.zeros((4, 5, 6), bool)
    b = np.zeros((4, 5, 6), bool)
    a[0, 1, 1] = True
    b[2, 1, 1] = True  # two voxels apart along axis 0
    assert hd95(a, b, spacing=(3.0, 1.0, 0.5)) == pytest.approx(6.0)
    assert hd95(a, b, spacing=(0.5, 1.0, 3.0)) == pytest.approx(1.0)
    assert hd95(a, a, spacing=(1, 1, 1)) == 0.0
    assert hd95(np.zeros_like(a), np.zeros_like(a), (1, 1, 1)) == 0.0
    assert math.isinf(hd95(a, np.zeros_like(a), (1, 1, 1)))


@pytest.fixture(scope="module")
def segmenter(tiny_sam, tiny_sam_checkpoint):
    return create_segmenter(tiny_sam, torch.device("cpu"), tiny_sam_checkpoint)


def test_stage_figures_with_the_oracle(segmenter):
    volume = np.stack([disk_image(radius=6 + i) for i in range(4)]).astype(np.float32)
    reference = volume > 100
    reference[3] = False  # tissue in the image, none in the reference: a false positive if drawn
    result = evaluate_volume(volume, reference, segmenter, OracleScorer(), ["x"],
                             VolumeSettings(proposal=ProposalSettings.from_dict(TINY_SAM_PROPOSALS)),
                             spacing=(2.0, 1.0, 1.0))
    assert result.slices_with_reference == 3 and len(result.slices) == 4
    for row in result.slices[:3]:
        assert row.retrieved == pytest.approx(row.ceiling)  # the oracle retrieves the best proposal
        assert 0.0 <= row.refined <= 1.0 and 0.0 <= row.box_bound <= 1.0
    assert result.slices[3].ceiling is None and result.false_positive_slices == 1
    assert result.dice_mean_per_slice == pytest.approx(np.mean([r.refined for r in result.slices[:3]]))
    assert json.dumps(result.to_dict(), allow_nan=False)


def test_salip_evaluate_on_a_real_brain(tmp_path, mni152, capsys):
    """LiteMedSAM's real weights with the oracle on MNI152 slices 89-90.

    Measured on slices 88-91: ceiling 0.31 = retrieved 0.31, refined 0.29, box bound 0.46.
    """
    volume, reference = mni152
    t1, mask = tmp_path / "t1.nrrd", tmp_path / "mask.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(t1))
    sitk.WriteImage(sitk.GetImageFromArray(reference.astype(np.uint8)), str(mask))
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(t1), str(mask), "-p", "brain", "--sam", "litemedsam", "--clip", "oracle",
                 "--slices", "89:91", "--axis", "0", "--json", str(out), "-q"]) == 0
    assert "box upper bound" in capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["slices_with_reference"] == 2
    assert figures["retrieved_mean"] == pytest.approx(figures["ceiling_mean"])
    assert figures["box_bound_mean"] > 0.4
    # Two slices of similar area: the 3D Dice is close to their mean Dice. (United parts may beat
    # the reference's tight box: LiteMedSAM's mask sits inside its box.)
    assert 0.15 < figures["dice_volume"] < 1.0
    assert figures["dice_volume"] == pytest.approx(figures["dice_mean_per_slice"], abs=0.1)
    assert figures["hd95_mm"] > 0
    modes = figures["modes"]
    assert set(modes) == {"propagate", "every-slice"}
    for mode in modes.values():
        assert mode["slices_with_reference"] == 2 and mode["painted_without_target"] == 0
        assert 0.15 < mode["dice_volume"] <= 1 and len(mode["slices"]) == 2


def test_measure_run_counts_painted_missed_and_how_well_the_flags_find_poor_slices():
    reference = np.zeros((6, 8, 8), bool)
    reference[1:5, 2:6, 2:6] = True
    mask = np.zeros_like(reference)
    mask[0, 2:6, 2:6] = True  # painted where there is no target
    mask[1, 2:6, 2:6] = True  # right
    mask[2, 2:3, 2:4] = True  # a poor sliver (Dice 2 x 2 / (2 + 16))
    mask[3, 2:6, 2:6] = True  # right, but flagged
    # slice 4 missed, slice 5 rightly empty
    flags = {0: [], 1: [], 2: ["area jump"], 3: ["low score"], 4: ["empty mask"], 5: []}
    records = [SliceRecord(index=k, reason=None, flags=flags[k]) for k in range(6)]
    result = VolumeResult(mask=mask, slices=records, axis=0, slice_range=(0, 6), window=(0, 1), seconds=2.0)
    figures = measure_run(result, reference, spacing=(1, 1, 1))
    assert (figures.painted_without_target, figures.missed_slices, figures.slices_with_reference) == (1, 1, 4)
    assert [round(s.dice, 2) for s in figures.slices] == [0.0, 1.0, 0.22, 1.0, 0.0, 1.0]
    assert figures.poor_slices == 3 and figures.flagged_slices == 3  # poor: 0, 2, 4; flagged: 2, 3, 4
    assert figures.flag_recall == pytest.approx(2 / 3) and figures.flag_precision == pytest.approx(2 / 3)
    assert figures.dice_volume == pytest.approx(2 * 34 / (50 + 64))
    assert json.dumps(figures.to_dict(), allow_nan=False)


def test_evaluate_modes_runs_each_mode_over_the_whole_range(segmenter):
    volume = np.stack([disk_image(radius=6 + i) for i in range(4)]).astype(np.float32)
    reference = volume > 100
    rows = evaluate_modes(volume, reference, segmenter, OracleScorer(), ["x"],
                          VolumeSettings(proposal=ProposalSettings.from_dict(TINY_SAM_PROPOSALS)))
    assert [r.mode for r in rows] == ["propagate", "every-slice"]
    assert all(len(r.slices) == 4 and r.slices_with_reference == 4 for r in rows)


def _case(folder, name, radius):
    volume = np.stack([disk_image(size=40, radius=radius + i) for i in range(3)]).astype(np.int16)
    (folder / "images").mkdir(exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(folder / "images" / f"{name}_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray((volume > 100).astype(np.uint8)), str(folder / "labels" / f"{name}.nii.gz"))


def test_evaluate_dataset_writes_per_case_tables_and_goes_on_after_a_failure(
        tmp_path, tiny_sam, tiny_sam_checkpoint, capsys):
    import csv

    data = tmp_path / "data"
    data.mkdir()
    _case(data, "case_a", 6)
    _case(data, "case_b", 9)
    (data / "labels" / "case_b.nii.gz").rename(data / "labels" / "case_b_moved.nii.gz")  # b has no label now
    _case(data, "case_c", 7)
    options = ["-p", "brain", "--sam", tiny_sam, "--sam-checkpoint", str(tiny_sam_checkpoint), "--clip", "oracle",
               "--device", "cpu", "-q", "--points-per-side", "4", "--pred-iou-thresh=-1e9",
               "--stability-thresh=-1e9", "--max-area", "1.0"]
    assert main(["evaluate-dataset", str(data), "-o", str(tmp_path / "table")] + options) == 0
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [r["case"] for r in rows] == ["case_a", "case_b", "case_c", "mean"]
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("failed") and rows[3]["status"] == "2 of 3 ok"
    assert float(rows[3]["dice_volume"]) == pytest.approx((float(rows[0]["dice_volume"]) +
                                                            float(rows[2]["dice_volume"])) / 2, abs=1e-3)
    markdown = (tmp_path / "table.md").read_text()
    assert markdown.startswith("| case | status |") and markdown.count("\n") == 6

    # The same pairs from a CSV, paths relative to it.
    (tmp_path / "pairs.csv").write_text("image,reference\ndata/images/case_a_0000.nii.gz,data/labels/case_a.nii.gz\n")
    assert main(["evaluate-dataset", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "one")] + options) == 0
    assert [r["case"] for r in csv.DictReader((tmp_path / "one.csv").open())] == ["case_a", "mean"]


def test_evaluate_reports_adapted_against_fixed(tmp_path, tiny_sam, tiny_sam_checkpoint, capsys):
    data = tmp_path / "d"
    data.mkdir()
    _case(data, "c", 6)
    out = tmp_path / "e.json"
    assert main(["evaluate", str(data / "images" / "c_0000.nii.gz"), str(data / "labels" / "c.nii.gz"), "-p", "x",
                 "--sam", tiny_sam, "--sam-checkpoint", str(tiny_sam_checkpoint), "--clip", "oracle", "--adapt",
                 "--points-per-side", "4", "--pred-iou-thresh=-1e9", "--stability-thresh=-1e9", "--max-area", "1",
                 "--json", str(out), "-q"]) == 0
    assert "adapted" in capsys.readouterr().out
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"fixed", "adapted"}
    assert all(0 <= v["dice_volume"] <= 1 for v in variants.values())
