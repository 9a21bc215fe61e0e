"""Odd but legal inputs go through; unusable ones fail with the documented code, writing nothing."""

import numpy as np
import SimpleITK as sitk

from SaLIPSegmentLib.cli import main

from conftest import disk_image


def _models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    return ["--sam", tiny_sam, "--sam-checkpoint", str(tiny_sam_checkpoint), "--clip", tiny_clip_option,
            "--device", "cpu", "-q", "--mode", "every-slice"]


def _write(array, path):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return str(path)


def test_one_by_one_slices(tmp_path, tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    volume = _write(np.arange(4, dtype=np.int16).reshape(4, 1, 1), tmp_path / "thin.nrrd")
    assert main(["segment", volume, "-p", "brain", "-o", str(tmp_path / "o.seg.nrrd")]
                + _models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option)) == 0


def test_integer_types_at_their_limits(tmp_path, tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    for dtype in (np.uint8, np.int32, np.uint32, np.int64):
        info = np.iinfo(dtype)
        volume = np.where(np.stack([disk_image(size=32)] * 2) > 100, info.max, info.min).astype(dtype)
        path = _write(volume, tmp_path / f"{dtype.__name__}.nrrd")
        assert main(["segment", path, "-p", "brain", "-o", str(tmp_path / f"{dtype.__name__}.seg.nrrd")]
                    + _models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option)) == 0, dtype


def test_a_prompt_in_another_language_is_free_text(tmp_path, tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    volume = _write(np.stack([disk_image(size=32)] * 2).astype(np.int16), tmp_path / "v.nrrd")
    import slicerio

    for number, (prompt, name) in enumerate((("cerveau", "cerveau"), ("cœur gauche", "coeur gauche"),
                                              ("肺", "Segment"), ("Niere links", "Niere links"))):
        out = tmp_path / f"{number}.seg.nrrd"
        assert main(["segment", volume, "-p", prompt, "-o", str(out)]
                    + _models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option)) == 0
        assert [s["name"] for s in slicerio.read_segmentation(str(out))["segments"]] == [name]


def test_an_rgb_picture_is_read_as_grey(tmp_path, tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    grey = disk_image(size=40)
    rgb = sitk.GetImageFromArray(np.stack([grey, grey // 2, grey // 3], axis=-1), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "us.png"))
    assert main(["segment", str(tmp_path / "us.png"), "-p", "fetal head", "-o", str(tmp_path / "us.seg.nrrd")]
                + _models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option)) == 0


def test_a_3d_vector_volume_is_refused(tmp_path, capsys, tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    vector = sitk.GetImageFromArray(np.zeros((3, 8, 8, 3), np.uint8), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "rgb3d.nrrd"))
    out = tmp_path / "o.seg.nrrd"
    assert main(["segment", str(tmp_path / "rgb3d.nrrd"), "-p", "brain", "-o", str(out)]
                + _models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option)) == 3
    assert "components per voxel" in capsys.readouterr().err and not out.exists()


def test_a_full_disk_leaves_the_old_output_whole(tmp_path, tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    """The disk fills up mid-write (a file-size limit makes every write past 512 bytes fail, as ENOSPC would)."""
    import os
    import resource
    import subprocess
    import sys

    from conftest import TINY_MODELS_PLUGIN

    volume = _write(np.stack([disk_image(size=64)] * 3).astype(np.int16), tmp_path / "v.nrrd")
    output, report = tmp_path / "o.seg.nrrd", tmp_path / "o.json"
    models = _models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option)
    assert main(["segment", volume, "-p", "brain", "-o", str(output), "--report", str(report)] + models) == 0
    old_output, old_report = output.read_bytes(), report.read_bytes()
    assert len(old_output) > 512

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    run = subprocess.run(
        [sys.executable, "-m", "SaLIPSegmentLib.cli", "segment", volume, "-p", "lungs", "-o", str(output),
         "--report", str(report), "--overwrite"] + models, preexec_fn=small_disk, capture_output=True, text=True,
        env=dict(os.environ, SALIP_PLUGINS=str(TINY_MODELS_PLUGIN)), timeout=300)
    assert run.returncode == 5, run.stderr
    assert "Could not write" in run.stderr and "Traceback" not in run.stderr
    assert output.read_bytes() == old_output and report.read_bytes() == old_report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json", "o.seg.nrrd", "v.nrrd"]  # no temporary left


def test_a_very_large_picture_comes_back_at_full_size(tmp_path, tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    """A 3000 x 3000 picture (a scanned film): segmented at 1024 px, written at 3000 px."""
    import json

    import slicerio

    picture = np.kron(disk_image(size=60), np.ones((50, 50), np.uint8))
    sitk.WriteImage(sitk.GetImageFromArray(picture), str(tmp_path / "film.png"))
    out, report = tmp_path / "film.seg.nrrd", tmp_path / "film.json"
    assert main(["segment", str(tmp_path / "film.png"), "-p", "lungs", "-o", str(out), "--report", str(report)]
                + _models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option)) == 0
    segmentation = slicerio.read_segmentation(str(out))
    assert segmentation["voxels"].shape[:2] == (3000, 3000)
    assert json.loads(report.read_text())["summary"]["working_shape"] == [1024, 1024]


def _watch(stream, seen: bytearray, pattern, reached) -> None:
    """Read a progress bar byte by byte; set `reached` when it matches (or when the stream ends)."""
    while byte := stream.read(1):
        seen.extend(byte)
        if pattern.search(bytes(seen[-200:])):
            reached.set()
    reached.set()


def test_ctrl_c_at_any_point_leaves_the_old_output_exactly(tmp_path, tiny_sam, tiny_sam_checkpoint, tiny_clip_option,
                                                          sigint_reaches_children):
    """A real SIGINT into `salip segment --overwrite`, sent when the progress bar shows slice N."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading

    from conftest import TINY_MODELS_PLUGIN

    volume = _write(np.stack([disk_image(size=48, radius=6 + i % 9) for i in range(20)]).astype(np.int16),
                    tmp_path / "v.nrrd")
    output, report = tmp_path / "o.seg.nrrd", tmp_path / "o.json"
    models = [m for m in _models(tiny_sam, tiny_sam_checkpoint, tiny_clip_option) if m != "-q"]
    assert main(["segment", volume, "-p", "brain", "-o", str(output), "--report", str(report), "-q"] + models) == 0
    old_output, old_report = output.read_bytes(), report.read_bytes()

    # Before the first slice, midway, and late: four slices to go leave the signal time to land on a
    # loaded machine (the watcher thread can lag the bar by a slice or two).
    for at_slice in (0, 8, 15):
        process = subprocess.Popen(
            [sys.executable, "-m", "SaLIPSegmentLib.cli", "segment", volume, "-p", "lungs", "-o", str(output),
             "--report", str(report), "--overwrite"] + models,
            stderr=subprocess.PIPE, env=dict(os.environ, SALIP_PLUGINS=str(TINY_MODELS_PLUGIN)))
        seen, reached = bytearray(), threading.Event()
        pattern = re.compile(rb"segmenting:.*\b%d/20\b" % at_slice)
        threading.Thread(target=_watch, args=(process.stderr, seen, pattern, reached), daemon=True).start()
        assert reached.wait(120)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130, (at_slice, seen.decode(errors="replace")[-500:])
        assert output.read_bytes() == old_output and report.read_bytes() == old_report, at_slice
        assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json", "o.seg.nrrd", "v.nrrd"]
