"""`salip batch` over real volumes: every case written, resumable, edits never overwritten, engines agree.

Cases are slabs of the real MNI152 T1 template (as NIfTI, NRRD and a DICOM series) and
a corrupt file; models are the tiny real architectures, loaded as a SALIP_PLUGINS
plugin so that worker processes and Ray actors know them too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SaLIPSegmentLib.batch import MANIFEST_NAME
from SaLIPSegmentLib.cli import main
from SaLIPSegmentLib.io import read_image

from conftest import TINY_MODELS_PLUGIN, disk_image

SLABS = {"t1_upper.nii.gz": (100, 118), "t1_lower.nrrd": (50, 68), "t1_middle.mha": (75, 93)}


def _slab(t1, start, stop):
    """Every third voxel of the 1 mm template: a 3 mm isotropic slab, sliced along k."""
    image = sitk.GetImageFromArray(t1[start:stop:3, ::3, ::3].astype(np.int16))
    image.SetSpacing((3.0, 3.0, 3.0))
    image.SetOrigin((-98.0, -134.0, -72.0 + start))
    return image


def _write_dicom_series(image, folder: Path):
    """One file per slice with the tags GDCM orders a series by."""
    folder.mkdir()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    for index in range(image.GetDepth()):
        plane = image[:, :, index]
        position = image.TransformIndexToPhysicalPoint((0, 0, index))
        for tag, value in {"0008|0060": "MR", "0020|000e": series_uid, "0020|0013": str(index + 1),
                           "0020|0032": "\\".join(f"{v:.3f}" for v in position),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "3.0"}.items():
            plane.SetMetaData(tag, value)
        sitk.WriteImage(plane, str(folder / f"slice{index:03d}.dcm"))


@pytest.fixture
def dataset(tmp_path, mni152):
    t1, _ = mni152
    folder = tmp_path / "volumes"
    folder.mkdir()
    for name, (start, stop) in SLABS.items():
        sitk.WriteImage(_slab(t1, start, stop), str(folder / name))
    _write_dicom_series(_slab(t1, 90, 102), folder / "dicom_series")
    (folder / "broken.nii.gz").write_bytes(b"not a volume")
    flat = sitk.GetImageFromArray(np.full((3, 20, 20), 7, np.int16))
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))  # kept aside: a case that fails inside the worker
    return folder


@pytest.fixture
def plugin_env(monkeypatch):
    monkeypatch.setenv("SALIP_PLUGINS", str(TINY_MODELS_PLUGIN))


@pytest.fixture
def batch_models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    return ["-p", "brain", "--sam", tiny_sam, "--sam-checkpoint", str(tiny_sam_checkpoint),
            "--clip", tiny_clip_option, "--device", "cpu", "-q"]


def _manifest(folder):
    return json.loads((folder / MANIFEST_NAME).read_text())


def _masks(folder, suffix=".seg.nrrd"):
    return {p.name[: -len(suffix)]: read_image(p).array for p in sorted(folder.glob(f"*{suffix}"))}


def _stamps(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.name != MANIFEST_NAME}


def test_batch_writes_every_case_records_failures_and_resumes(dataset, tmp_path, batch_models, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(dataset), str(out)] + batch_models) == 3  # one case is broken
    printed = capsys.readouterr().out
    assert "broken" in printed and "failed" in printed
    cases = _manifest(out)["cases"]
    assert {c for c, e in cases.items() if e["status"] == "done"} == {"t1_upper", "t1_lower", "t1_middle",
                                                                     "dicom_series"}
    assert cases["broken"]["status"] == "failed" and "Could not read" in cases["broken"]["error"]
    for case, mask in _masks(out).items():
        source = dataset / next(n for n in os.listdir(dataset) if n.startswith(case))
        image = read_image(source)
        assert mask.shape == image.array.shape
        segmentation = read_image(out / f"{case}.seg.nrrd")
        assert np.allclose(segmentation.origin, image.origin) and np.allclose(segmentation.spacing, image.spacing)
        report = json.loads((out / f"{case}.report.json").read_text())
        assert report["summary"]["voxels"] == mask.astype(bool).sum() == cases[case]["voxels"]
        assert report["axis"] == 0 and report["slice_range"] == [0, mask.shape[0]]
    assert any(mask.any() for mask in _masks(out).values())

    before = _stamps(out)
    assert main(["batch", str(dataset), str(out)] + batch_models) == 3  # the broken case is tried again
    assert capsys.readouterr().out.splitlines()[1].split()[:4] == ["5", "0", "4", "1"]  # cases done skipped failed
    assert _stamps(out) == before  # nothing finished was redone

    # A changed input is redone, and only it.
    lower = read_image(dataset / "t1_lower.nrrd").array
    changed = sitk.GetImageFromArray(lower[::-1].copy())
    changed.CopyInformation(sitk.ReadImage(str(dataset / "t1_lower.nrrd")))
    sitk.WriteImage(changed, str(dataset / "t1_lower.nrrd"))
    (dataset / "broken.nii.gz").unlink()
    assert main(["batch", str(dataset), str(out)] + batch_models) == 0
    after = _stamps(out)
    assert {n for n in after if after[n] != before.get(n)} == {"t1_lower.seg.nrrd", "t1_lower.report.json"}


def test_batch_never_overwrites_a_file_it_did_not_write(dataset, tmp_path, batch_models, capsys):
    out = tmp_path / "out"
    (dataset / "broken.nii.gz").unlink()
    assert main(["batch", str(dataset), str(out)] + batch_models) == 0
    # A curator corrects one result in place, then the batch is re-run with other settings.
    edited = out / "t1_upper.seg.nrrd"
    edited.write_bytes(edited.read_bytes() + b"\n")
    stranger = out / "t1_lower.report.json"
    stranger.unlink()
    stranger.write_text("someone else's notes")
    rerun = ["batch", str(dataset), str(out), "--key-interval", "2"] + batch_models
    assert main(rerun) == 3
    printed = capsys.readouterr().out
    assert "t1_upper" in printed and "t1_lower" in printed and "--overwrite" in printed
    assert edited.read_bytes().endswith(b"\n") and stranger.read_text() == "someone else's notes"
    cases = _manifest(out)["cases"]
    assert cases["t1_middle"]["status"] == "done" and cases["t1_upper"]["status"] == "failed"
    assert main(rerun + ["--overwrite"]) == 0
    assert stranger.read_text() != "someone else's notes"


def test_batch_nifti_labelmaps_match_the_segmentations(dataset, tmp_path, batch_models):
    (dataset / "broken.nii.gz").unlink()
    assert main(["batch", str(dataset), str(tmp_path / "seg")] + batch_models) == 0
    assert main(["batch", str(dataset), str(tmp_path / "nii"), "--format", "nifti"] + batch_models) == 0
    segmentations, labelmaps = _masks(tmp_path / "seg"), _masks(tmp_path / "nii", ".nii.gz")
    assert set(labelmaps) == set(segmentations) == {"t1_upper", "t1_lower", "t1_middle", "dicom_series"}
    for case, labels in labelmaps.items():
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
        assert np.array_equal(labels.astype(bool), segmentations[case].astype(bool))
        written = sitk.ReadImage(str(tmp_path / "nii" / f"{case}.nii.gz"))
        source = read_image(dataset / "dicom_series" if case == "dicom_series" else
                            next(dataset.glob(f"{case}.*")))
        assert np.allclose(written.GetSpacing(), source.spacing) and np.allclose(written.GetOrigin(), source.origin)


def test_a_case_failing_in_a_worker_process_is_recorded_and_the_rest_go_on(dataset, tmp_path, batch_models,
                                                                            plugin_env):
    (dataset / "broken.nii.gz").unlink()
    shutil.copy(tmp_path / "flat.nrrd", dataset / "flat.nrrd")
    out = tmp_path / "out"
    assert main(["batch", str(dataset), str(out), "--workers", "2"] + batch_models) == 3
    cases = _manifest(out)["cases"]
    assert cases["flat"]["status"] == "failed" and "no contrast" in cases["flat"]["error"]
    assert {c for c, e in cases.items() if e["status"] == "done"} == {"t1_upper", "t1_lower", "t1_middle",
                                                                     "dicom_series"}
    assert not (out / "flat.seg.nrrd").exists()


def test_a_worker_process_that_dies_fails_its_case_and_the_batch_goes_on(dataset, tmp_path, batch_models,
                                                                          monkeypatch):
    """The kernel kills a worker mid-case (simulated by a model that exits its process on one volume)."""
    from conftest import CRASHING_MODEL_PLUGIN

    monkeypatch.setenv("SALIP_PLUGINS", os.pathsep.join([str(TINY_MODELS_PLUGIN), str(CRASHING_MODEL_PLUGIN)]))
    (dataset / "broken.nii.gz").unlink()
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([disk_image(size=20, center=(10, 10), radius=6)] * 3)),
                    str(dataset / "bomb.nrrd"))
    out = tmp_path / "out"
    models = ["crashing-sam" if option == "tiny-sam" else option for option in batch_models]
    assert main(["batch", str(dataset), str(out), "--workers", "2"] + models) == 3
    cases = _manifest(out)["cases"]
    assert cases["bomb"]["status"] == "failed" and "worker process died" in cases["bomb"]["error"]
    done = {c for c, e in cases.items() if e["status"] == "done"}
    # The case that shared the dying pool may fail with it; every other case is done, and a re-run finishes all.
    assert len(done) >= 3 and done <= {"t1_upper", "t1_lower", "t1_middle", "dicom_series"}
    (dataset / "bomb.nrrd").unlink()
    assert main(["batch", str(dataset), str(out), "--workers", "2"] + models) == 0


def test_batch_csv_list_and_name_clashes(dataset, tmp_path, batch_models, capsys):
    listing = tmp_path / "cases.csv"
    listing.write_text("image,case\nvolumes/t1_upper.nii.gz,first\nvolumes/t1_lower.nrrd,second\n")
    assert main(["batch", str(listing), str(tmp_path / "out")] + batch_models) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.seg.nrrd")) == ["first.seg.nrrd", "second.seg.nrrd"]
    clash = tmp_path / "clash.csv"
    clash.write_text("image\nvolumes/t1_upper.nii.gz\nvolumes/t1_upper.nii.gz\n")
    assert main(["batch", str(clash), str(tmp_path / "out2")] + batch_models) == 3
    assert "same outputs: t1_upper" in capsys.readouterr().err


def test_batch_refuses_the_oracle_and_a_missing_plugin(dataset, tmp_path, batch_models, monkeypatch, capsys):
    assert main(["batch", str(dataset), str(tmp_path / "o"), "-p", "brain", "--sam", "litemedsam",
                 "--clip", "oracle"]) == 3
    assert "reference" in capsys.readouterr().err
    monkeypatch.setenv("SALIP_PLUGINS", str(tmp_path / "missing_plugin.py"))
    assert main(["batch", str(dataset), str(tmp_path / "o")] + batch_models) == 4
    assert "missing_plugin.py" in capsys.readouterr().err


def _salip(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "SaLIPSegmentLib.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_batch_interrupted_and_resumed_redoes_nothing_and_loses_nothing(dataset, tmp_path, batch_models,
                                                                        plugin_env, sigint_reaches_children):
    (dataset / "broken.nii.gz").unlink()
    for index in range(3):  # more cases, so that the interrupt lands mid-run
        shutil.copytree(dataset / "dicom_series", dataset / f"series_copy{index}")
    out = tmp_path / "out"
    process = _salip("batch", str(dataset), str(out), "--workers", "2", *batch_models)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (out / MANIFEST_NAME).exists() and len(_manifest(out)["cases"]) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "goes on where this one stopped" in err
    first = {c for c, e in _manifest(out)["cases"].items() if e["status"] == "done"}
    assert 2 <= len(first) < 7
    for case in first:  # every recorded case is whole on disk
        assert read_image(out / f"{case}.seg.nrrd").array.shape == read_image(
            next(p for p in dataset.iterdir() if p.name.startswith(case))).array.shape
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.name != MANIFEST_NAME}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind

    resumed = _salip("batch", str(dataset), str(out), *batch_models)
    summary, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    counts = summary.splitlines()[1].split()
    assert counts[:4] == ["7", str(7 - len(first)), str(len(first)), "0"]  # cases, done, skipped, failed
    assert all((out / name).read_bytes() == data for name, data in kept.items())  # nothing redone
    assert {c for c, e in _manifest(out)["cases"].items() if e["status"] == "done"} == {
        "t1_upper", "t1_lower", "t1_middle", "dicom_series", "series_copy0", "series_copy1", "series_copy2"}

    # Nothing lost either: the resumed set equals one uninterrupted run.
    straight = tmp_path / "straight"
    assert main(["batch", str(dataset), str(straight)] + batch_models) == 0
    assert {k: v.tobytes() for k, v in _masks(out).items()} == {k: v.tobytes() for k, v in _masks(straight).items()}


@pytest.fixture
def local_ray_cluster():
    """A Ray head on 127.0.0.1 only, with token authentication, stopped afterwards."""
    import secrets
    import socket
    import tempfile

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # keeps every Ray process on the loopback interface
    ray = [str(Path(sys.executable).with_name("ray"))]
    sessions = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must fit in 107 bytes
    subprocess.run(ray + ["start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                          "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={sessions}"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run(ray + ["stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(sessions, ignore_errors=True)


def test_batch_on_a_local_ray_cluster_gives_identical_masks(dataset, tmp_path, batch_models, plugin_env,
                                                             local_ray_cluster):
    address, env = local_ray_cluster
    (dataset / "broken.nii.gz").unlink()
    process = _salip("batch", str(dataset), str(tmp_path / "ray_out"), "--engine", "ray", "--address", address,
                     "--format", "nifti", *batch_models, env=env)
    summary, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    workers = {e["worker"] for e in _manifest(tmp_path / "ray_out")["cases"].values()}
    assert all(str(os.getpid()) not in worker for worker in workers)  # computed by the actors
    assert main(["batch", str(dataset), str(tmp_path / "local_out"), "--format", "nifti"] + batch_models) == 0
    on_ray, local = _masks(tmp_path / "ray_out", ".nii.gz"), _masks(tmp_path / "local_out", ".nii.gz")
    assert set(on_ray) == {"t1_upper", "t1_lower", "t1_middle", "dicom_series"}
    assert any(labels.any() for labels in on_ray.values())
    assert {k: v.tobytes() for k, v in on_ray.items()} == {k: v.tobytes() for k, v in local.items()}
