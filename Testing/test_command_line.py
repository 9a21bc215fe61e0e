"""`salip` as a new user runs it: formats by name, sides of paired organs, the CPU default,
file modes, arguments refused before any model loads, and what the run says at the end."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SaLIPSegmentLib.anatomy import anatomical_plane, keep_patient_side
from SaLIPSegmentLib.cli import main
from SaLIPSegmentLib.io import read_image
from SaLIPSegmentLib.prompts import get_preset, resolve_prompt
from SaLIPSegmentLib.settings import PropagationSettings

from conftest import disk_image
from slicer_mrml import read_segments_on_reference

ROOT = Path(__file__).resolve().parents[1]
OBLIQUE = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]) @ np.array(
    [[1.0, 0.0, 0.0], [0.0, 0.6, -0.8], [0.0, 0.8, 0.6]])


def _volume(path, slices=3, size=40, spacing=(0.7, 1.3, 3.0), origin=(-12.5, 40.0, 7.25), direction=OBLIQUE,
            blank_slice=None):
    array = np.stack([disk_image(size=size, center=(18, 22), radius=7 + 2 * i) for i in range(slices)])
    if blank_slice is not None:
        array[blank_slice] = 0
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, dtype=float).flatten().tolist())
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    return ["--sam", tiny_sam, "--sam-checkpoint", str(tiny_sam_checkpoint), "--clip", tiny_clip_option,
            "--device", "cpu"]


@pytest.fixture
def no_models(monkeypatch):
    """The default models with no weights and no internet: loading them would exit 4."""
    monkeypatch.setenv("SALIP_OFFLINE", "1")
    return ["--profile", "default"]


def _run(capsys, argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own refusals (exit 2)
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


# -- outputs by name ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_labelmap_name_writes_a_uint8_labelmap_on_the_inputs_grid(tmp_path, models, suffix):
    volume = _volume(tmp_path / "scan.nrrd")
    segmentation, labelmap = tmp_path / "brain.seg.nrrd", tmp_path / f"brain_mask{suffix}"
    assert main(["segment", str(volume), "-p", "brain", "-o", str(segmentation), "-q"] + models) == 0
    assert main(["segment", str(volume), "-p", "brain", "-o", str(labelmap), "-q"] + models) == 0

    written, source = sitk.ReadImage(str(labelmap)), sitk.ReadImage(str(volume))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(written)
    expected = read_segments_on_reference(segmentation, volume)[0]["Brain"]  # same models, same mask
    assert set(np.unique(labels)) <= {0, 1} and expected.any()
    np.testing.assert_array_equal(labels == 1, expected)
    if suffix.startswith(".nii"):  # the user: nibabel must read it too, with the same voxels
        import nibabel

        loaded = nibabel.load(str(labelmap))
        assert loaded.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(loaded.dataobj).transpose(2, 1, 0) == 1, expected)


def test_a_folder_gets_the_default_name_and_other_names_are_refused_first(tmp_path, models, capsys):
    volume = _volume(tmp_path / "scan.nii.gz")
    existing = tmp_path / "results"
    existing.mkdir()
    assert main(["segment", str(volume), "-p", "lungs", "-o", str(existing), "-q"] + models) == 0
    assert [p.name for p in existing.iterdir()] == ["scan_lungs.seg.nrrd"]
    new = tmp_path / "new"
    assert main(["segment", str(volume), "-p", "lungs", "-o", f"{new}/", "-q"] + models) == 0
    assert [p.name for p in new.iterdir()] == ["scan_lungs.seg.nrrd"]
    assert read_segments_on_reference(new / "scan_lungs.seg.nrrd", volume)[0]["Lungs"].shape == (3, 40, 40)

    for name in ("mask.png", "brain_mask", "mask.seg"):
        code, said = _run(capsys, ["segment", volume, "-p", "lungs", "-o", tmp_path / name, "--profile", "default"])
        assert code == 5 and ".seg.nrrd" in said and ".nii.gz" in said, said
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_honour_the_umask(tmp_path, models, umask, mode):
    volume = _volume(tmp_path / "scan.nrrd")
    output, report, picture = tmp_path / "o.nii.gz", tmp_path / "r.json", tmp_path / "qa.png"
    previous = os.umask(umask)
    try:
        assert main(["segment", str(volume), "-p", "brain", "-o", str(output), "--report", str(report), "-q"]
                    + models) == 0
        assert main(["qa", str(report), "-o", str(picture)]) == 0
    finally:
        os.umask(previous)
    for path in (output, report, picture):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


# -- left and right ----------------------------------------------------------------------------


def test_left_and_right_prompts_are_their_own_presets():
    kidneys = get_preset("kidneys")
    for text, name, side in (("left kidney", "left_kidney", "left"), ("Right Kidney", "right_kidney", "right"),
                             ("left lung", "left_lung", "left"), ("right-lung", "right_lung", "right")):
        prompt = resolve_prompt(text)
        assert (prompt.name, prompt.side, prompt.top_k, prompt.is_preset) == (name, side, 1, True)
        assert prompt.color != kidneys.color and prompt.color != get_preset("lungs").color
    assert resolve_prompt("left kidney").sentences != kidneys.sentences
    assert resolve_prompt("left kidney").color != resolve_prompt("right kidney").color
    assert get_preset("kidneys").side is None and get_preset("kidneys").top_k == 2


def _two_kidneys(direction):
    """A volume with a blob either side of the middle column, and its geometry."""
    array = np.zeros((4, 32, 48), np.int16)
    array[:, 8:24, 4:44] = 60  # the body
    array[:, 12:20, 8:16] = 200
    array[:, 12:20, 32:40] = 200
    image = sitk.GetImageFromArray(array)
    image.SetDirection(np.asarray(direction, dtype=float).flatten().tolist())
    image.SetOrigin((5.0, -3.0, 2.0))
    return image


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_a_side_keeps_the_patients_own_side_whatever_the_orientation(tmp_path, flip):
    # LPS: +x is the patient's left. With i along +x, the blob at high i is the left kidney;
    # with i along -x (flip), the same voxels are the right kidney.
    path = tmp_path / "k.nrrd"
    sitk.WriteImage(_two_kidneys(np.diag([flip, 1.0, 1.0])), str(path))
    image = read_image(path)
    both = image.array == 200
    left, result = keep_patient_side(both, image.array, image.ijk_to_lps, "left")
    high_i = np.zeros_like(both)
    high_i[..., 24:] = True
    np.testing.assert_array_equal(left, both & (high_i if flip > 0 else ~high_i))
    assert result.voxels_removed == int(both.sum() - left.sum()) > 0
    right, _ = keep_patient_side(both, image.array, image.ijk_to_lps, "right")
    np.testing.assert_array_equal(right, both & ~left)


def test_left_kidney_through_the_command_never_returns_the_right_one(tmp_path, tiny_sam, tiny_sam_checkpoint):
    volume, reference = tmp_path / "k.nrrd", tmp_path / "both.nrrd"
    image = _two_kidneys(np.eye(3))
    sitk.WriteImage(image, str(volume))
    both = sitk.GetArrayFromImage(image) == 200
    mask_image = sitk.GetImageFromArray(both.astype(np.uint8))
    mask_image.CopyInformation(image)
    sitk.WriteImage(mask_image, str(reference))
    output, report = tmp_path / "left.nii.gz", tmp_path / "r.json"
    assert main(["segment", str(volume), "-p", "left kidney", "-o", str(output), "--report", str(report),
                 "--sam", tiny_sam, "--sam-checkpoint", str(tiny_sam_checkpoint), "--clip", "oracle",
                 "--reference", str(reference), "--device", "cpu", "-q"]) == 0
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(output))) > 0
    assert not written[..., :24].any()  # the patient's right half (low x) holds nothing
    saved = json.loads(report.read_text())
    assert saved["prompt"]["name"] == "left_kidney" and saved["top_k"] == 1
    assert saved["laterality"]["side"] == "left"


# -- defaults for this machine -------------------------------------------------------------------


def test_without_a_gpu_the_fast_profile_is_used_and_said(tmp_path, capsys):
    volume = _volume(tmp_path / "scan.nrrd", size=48)
    reference = tmp_path / "ref.nrrd"
    source = sitk.ReadImage(str(volume))
    mask = sitk.GetImageFromArray((sitk.GetArrayFromImage(source) > 100).astype(np.uint8))
    mask.CopyInformation(source)
    sitk.WriteImage(mask, str(reference))
    where = ["--device", "cpu"] if torch.cuda.is_available() else []  # a GPU-less run, wherever the tests run
    base = ["segment", volume, "-p", "brain", "--clip", "oracle", "--reference", reference, "--slices", "1:2"] + where

    code, said = _run(capsys, base + ["-o", tmp_path / "a.seg.nrrd"])
    announced = "On the CPU (--device cpu): using" if where else "No GPU here: using the fast profile"
    assert code == 0 and announced in said and "Models: litemedsam + oracle" in said
    assert sum("fast profile" in line for line in said.splitlines()) == 1

    # --fast is --profile fast, chosen by the user: nothing to announce.
    from SaLIPSegmentLib.arguments import choose_profile
    from SaLIPSegmentLib.cli import build_parser

    args = build_parser().parse_args([str(a) for a in base + ["-o", tmp_path / "b.seg.nrrd", "--fast"]])
    assert choose_profile(args) is None and args.profile == "fast"


def test_profile_default_is_kept_when_asked_for(tmp_path, capsys, no_models):
    volume = _volume(tmp_path / "scan.nrrd")
    code, said = _run(capsys, ["segment", volume, "-p", "brain", "-o", tmp_path / "o.seg.nrrd", "--device", "cpu"]
                      + no_models)
    assert code == 4 and "sam_vit_b_01ec64.pth" in said and "fast profile" not in said


# -- fail fast -----------------------------------------------------------------------------------


def test_arguments_are_refused_before_any_model_loads(tmp_path, capsys, no_models):
    """With no weights and no internet, loading a model exits 4: each of these must exit first."""
    volume = _volume(tmp_path / "scan.nrrd", slices=10)
    out = tmp_path / "o.seg.nrrd"
    on_grid = _volume(tmp_path / "ref.nrrd", slices=10)
    other_spacing = _volume(tmp_path / "spacing.nrrd", slices=10, spacing=(0.7, 1.3, 2.0))
    other_origin = _volume(tmp_path / "origin.nrrd", slices=10, origin=(0.0, 0.0, 0.0))
    other_direction = _volume(tmp_path / "direction.nrrd", slices=10, direction=np.eye(3))
    segment = ["segment", volume, "-o", out, "-p", "brain"]
    cases = [
        (segment + ["--slices", "8:3"], 3, "reversed"),
        (segment + ["--slices", "95:85"], 3, "reversed"),
        (segment + ["--slices", "5:50"], 3, "outside this volume's 10 slices"),
        (segment + ["--slices", "4:4"], 3, "empty"),
        (segment + ["--slices", "a:b"], 3, "whole numbers"),
        (segment + ["--axis", "3"], 2, "invalid choice"),
        (segment + ["--clip", "oracle"], 3, "needs --reference"),
        (segment + ["--clip", "oracle-noisy"], 3, "needs --reference"),
        (segment + ["--reference", tmp_path / "missing.nrrd"], 3, "does not exist"),
        (segment + ["--reference", other_spacing], 3, "spacing"),
        (segment + ["--reference", other_origin], 3, "origin"),
        (segment + ["--reference", other_direction], 3, "direction"),
        (["segment", volume, "-o", out, "-p", "lugns"], 3, "did you mean lungs?"),
        (["segment", volume, "-o", out, "--preset", "lugns"], 3, "Did you mean lungs?"),
        (["segment", volume, "-o", out, "-p", "left kidny"], 3, "did you mean left_kidney?"),
        (["segment", volume, "-o", tmp_path / "o.png", "-p", "brain"], 5, ".seg.nrrd"),
        (["evaluate", volume, other_origin, "-p", "brain"], 3, "not on the input's grid"),
        (["evaluate", volume, on_grid, "-p", "brain", "--slices", "9:2"], 3, "reversed"),
        (["evaluate", volume, on_grid, "-p", "brain", "--modes", "propagate,everything"], 3, "everything"),
        (["batch", tmp_path / "nothing", tmp_path / "out", "-p", "lugns"], 3, "did you mean lungs?"),
    ]
    for argv, code, message in cases:
        got, said = _run(capsys, argv + no_models)
        assert (got, message in said, "Traceback" in said) == (code, True, False), (argv, said)
    assert not out.exists()
    code, said = _run(capsys, segment[:-2] + ["-p", "brain", "--slices", "8:3", "--device", "cpu"])
    assert code == 3 and "fast profile" not in said  # nothing announced for a run that does not start
    # The same words with --free-text are taken as asked, and get as far as the models.
    code, said = _run(capsys, ["segment", volume, "-o", out, "-p", "lugns", "--free-text"] + no_models)
    assert code == 4 and "sam_vit_b" in said


def test_a_reference_on_another_grid_is_refused_with_what_differs(tmp_path, capsys, no_models):
    volume = _volume(tmp_path / "scan.nrrd")
    shifted = _volume(tmp_path / "shifted.nrrd", origin=(-12.5, 40.0, 9.25))
    code, said = _run(capsys, ["evaluate", volume, shifted, "-p", "brain"] + no_models)
    assert code == 3 and "origin is (-12.5, 40, 9.25) mm, the input's (-12.5, 40, 7.25) mm" in said
    assert "resample" in said.lower()


# -- quick commands --------------------------------------------------------------------------------

QUICK_COMMANDS = (["--help"], ["segment", "--help"], ["batch", "--help"], ["prompts"], ["prompts", "left lung"],
                  ["models", "list"])


@pytest.mark.parametrize("argv", QUICK_COMMANDS, ids=" ".join)
def test_help_prompts_and_models_list_do_not_import_torch(argv):
    script = ("import sys\nfrom SaLIPSegmentLib.cli import main\n"
              "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
              "assert code == 0, code\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    environment = {k: v for k, v in os.environ.items() if k != "SALIP_PLUGINS"}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT / "SaLIPSegment"), environment.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script] + argv, capture_output=True, text=True, env=environment,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "NO-TORCH"


def test_models_list_without_torch_matches_the_registry(tmp_path, monkeypatch, tiny_sam):
    from SaLIPSegmentLib.models import catalog, registry

    monkeypatch.delenv("SALIP_PLUGINS", raising=False)
    quick, full = catalog.list_models(tmp_path), registry.list_models(tmp_path)
    built_in = [row for row in full if row.name in {r.name for r in quick}]  # the registry also knows test models
    assert quick == built_in and tiny_sam in {row.name for row in full} - {row.name for row in quick}
    assert [row.name for row in quick] == ["vit_b", "vit_l", "vit_h", "litemedsam", "ViT-B-32:openai",
                                           "ViT-B-16:openai", "ViT-L-14:openai", "oracle", "oracle-noisy"]
    assert next(row for row in quick if row.name == "litemedsam").present  # found without importing the package


# -- what the run says -------------------------------------------------------------------------------


def test_the_last_line_names_flagged_slices_and_the_report(tmp_path, capsys, models):
    volume = _volume(tmp_path / "scan.nrrd", slices=6)
    report = tmp_path / "r.json"
    code, said = _run(capsys, ["segment", volume, "-p", "brain", "-o", tmp_path / "o.nii.gz", "--report", report]
                      + models)
    last = said.strip().splitlines()[-1]
    saved = json.loads(report.read_text())
    flagged = [row["index"] for row in saved["slices"] if row["flags"]]
    looked = [row for row in saved["slices"] if row["method"] != "skipped" and not row["absent"]]
    assert code == 0 and last.startswith(f"Wrote {tmp_path / 'o.nii.gz'} (labelmap)")
    assert f"report: {report}" in last
    verdict = f"{len(flagged)} of {len(looked)} slice" if flagged else "no slice needs a look"
    assert verdict in last and saved["summary"]["verdict"].startswith(verdict)
    painted = [row for row in saved["slices"] if row["area"]]
    assert all(0.0 <= row["confidence"] <= 1.0 and "solidity" in row["quality"] for row in painted)
    code, said = _run(capsys, ["segment", volume, "-p", "brain", "-o", tmp_path / "p.seg.nrrd"] + models)
    assert "no report (--report FILE writes one)" in said.strip().splitlines()[-1]


def test_thick_slices_get_more_key_slices_and_the_report_says_how_many(tmp_path, capsys, models):
    from SaLIPSegmentLib.volume import key_positions

    def cascades(spacing, *options):
        volume = _volume(tmp_path / f"scan{spacing}.nrrd", slices=10, spacing=(0.7, 1.3, spacing), direction=np.eye(3))
        report = tmp_path / f"r{spacing}{len(options)}.json"
        code, said = _run(capsys, ["segment", volume, "-p", "brain", "-o", tmp_path / "o.nii.gz", "--report", report,
                                   "--axis", "0", "--overwrite", "-q", *options] + models)
        assert code == 0, said
        saved = json.loads(report.read_text())
        return saved["key_interval"], {row["index"] for row in saved["slices"] if row["method"] == "cascade"}

    interval, keys = cascades(6.0)  # 24 mm apart at most: every 4th slice of 6 mm
    assert interval == 4 and set(key_positions(10, 4)) <= keys
    slices_only = PropagationSettings.key_interval  # 1 mm slices, or no distance: the interval in slices
    assert cascades(1.0)[0] == slices_only and cascades(6.0, "--key-distance", "0")[0] == slices_only
    assert cascades(6.0, "--key-interval", "2")[0] == 2


def test_planes_follow_the_inputs_direction():
    assert [anatomical_plane(np.eye(3), axis) for axis in (0, 1, 2)] == ["axial", "coronal", "sagittal"]
    # A volume stored sagittally: numpy axis 0 (voxel k) runs along x, left-right.
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert anatomical_plane(sagittal, 0) == "sagittal" and anatomical_plane(sagittal, 2) == "coronal"


def test_the_qa_picture_names_the_plane_explains_the_score_and_marks_slice_kinds(tmp_path, models):
    import matplotlib.pyplot as plt

    from SaLIPSegmentLib.qa import draw_qa

    volume = _volume(tmp_path / "scan.nrrd", slices=6, direction=np.eye(3), blank_slice=5)
    report = tmp_path / "r.json"
    assert main(["segment", str(volume), "-p", "brain", "-o", str(tmp_path / "o.nii.gz"), "--report", str(report),
                 "--key-interval", "4", "-q"] + models) == 0
    saved = json.loads(report.read_text())
    methods = {row["method"] for row in saved["slices"]}
    assert {"cascade", "propagated", "skipped"} <= methods, methods
    saved["slices"][1]["flags"] = ["area jump"]  # a flagged slice, to see how it is drawn
    saved["slices"][1]["confidence"] = 0.25
    saved["summary"]["verdict"] = "1 of 5 slices need a look"
    report.write_text(json.dumps(saved))

    figure = draw_qa(report)
    try:
        texts = [t.get_text() for t in figure.texts]
        scores, areas = figure.axes[0], figure.axes[1]
        labels = [t.get_text() for t in scores.get_legend().get_texts()]
        markers = {line.get_label(): (line.get_marker(), line.get_fillstyle()) for line in scores.get_lines()}
        bars = [t.get_text() for t in areas.get_legend().get_texts()]
        title, panels = scores.get_title(), [a.get_title() for a in figure.axes[3:]]
    finally:
        plt.close(figure)
    assert areas.get_xlabel().startswith("axial slice")
    assert any("100 x cosine" in text for text in texts) and "100 x cosine" in scores.get_ylabel()
    assert {"full cascade (key slice)", "propagated from a neighbour", "flagged", "skipped (uniform slice)"} <= set(
        labels)
    assert len({markers["full cascade (key slice)"], markers["propagated from a neighbour"], markers["flagged"]}) == 3
    assert bars == ["full cascade", "propagated", "skipped", "flagged"]  # the area bars' colours say it too
    assert title.endswith("1 of 5 slices need a look")
    assert "axial slice 1, confidence 0.25\narea jump" in panels


# -- the README, as written -------------------------------------------------------------------------


def _readme_commands(heading):
    import shlex

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    start = section.index("```sh") + len("```sh")
    block = section[start:section.index("```", start)]
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith(".venv/bin/salip")]


def _dicom_series(folder, slices=80, size=24):
    folder.mkdir()
    for index in range(slices):
        image = sitk.GetImageFromArray(disk_image(size=size, center=(12, 12), radius=4 + index % 5).astype(np.int16))
        image.SetSpacing((0.8, 0.8))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0013": str(index + 1), "0020|0032": f"0\\0\\{2.5 * index}", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.8\\0.8", "0018|0050": "2.5", "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{index}",
        }.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{index:03d}.dcm"))
        writer.Execute(image)


def test_the_readme_usage_examples_work_as_written(tmp_path, monkeypatch, capsys, models):
    """Every `salip` line of README's Usage block, on files with the names it uses (test-sized models)."""
    monkeypatch.chdir(tmp_path)
    _volume(tmp_path / "scan.nii.gz")
    _dicom_series(tmp_path / "dicom_folder")
    commands = _readme_commands("## Usage")
    assert [argv[0] for argv in commands] == ["segment", "segment", "segment", "qa", "prompts", "models"]
    for argv in commands:
        code, said = _run(capsys, argv + (models if argv[0] == "segment" else []))
        assert code == 0, (argv, said)
    assert read_segments_on_reference(tmp_path / "lungs.seg.nrrd", tmp_path / "scan.nii.gz")[0]["Lungs"].shape
    assert sitk.ReadImage("brain_mask.nii.gz").GetPixelID() == sitk.sitkUInt8
    kidney = tmp_path / "results" / "dicom_folder_left_kidney.seg.nrrd"
    assert kidney.is_file() and json.loads((tmp_path / "report.json").read_text())["slice_range"] == [40, 80]
    assert (tmp_path / "qa.png").is_file()
