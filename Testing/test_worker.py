"""The effect's engine in a child process, end to end with real processes and Slicer's real MRML.

What the effect does, minus Qt: the volume of a real MRML node goes to a temporary file, a
child `python -m SaLIPSegmentLib.worker` (the tiny real architectures, as a SALIP_PLUGINS
plugin) streams JSON progress lines that are read with non-blocking reads, and its mask
becomes a preview on the volume's exact geometry. Cancel kills the child and leaves the scene
as it was; a child that dies becomes an error with the reason; the models stay loaded
between requests.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_slicer_bridge import OBLIQUE, assert_same, blob, segment_array_on_reference, snapshot

from SaLIPSegmentLib import jobs
from SaLIPSegmentLib import slicer_bridge as bridge
from SaLIPSegmentLib.errors import InputError

from conftest import CRASHING_MODEL_PLUGIN, TINY_MODELS_PLUGIN, disk_image
from slicer_mrml import add_volume, new_scene

ENGINE_PARENT = str(Path(__file__).resolve().parents[1] / "SaLIPSegment")
DEADLINE_S = 240


def engine_worker(*plugins) -> jobs.EngineWorker:
    env = dict(os.environ, SALIP_PLUGINS=os.pathsep.join(str(p) for p in plugins or (TINY_MODELS_PLUGIN,)),
               SALIP_CPU_RUNTIME="torch")
    return jobs.EngineWorker(lambda: jobs.worker_command(sys.executable),
                             lambda: jobs.worker_environment(env, ENGINE_PARENT))


def wait(worker, job, until=lambda job: job.finished, events=None):
    deadline = time.monotonic() + DEADLINE_S
    while not until(job):
        assert time.monotonic() < deadline, f"no answer from the worker; log:\n{worker.process.log_tail()}"
        got = worker.poll(job)
        if events is not None:
            events.extend(got)
        time.sleep(0.02)
    return job


def request_for(node, folder, sam, clip, **settings):
    """What the effect sends: the volume's voxels in a file, its IJK-to-world matrix, and the run's settings."""
    array, geometry = bridge.volume_to_numpy(node)
    volume_path = os.path.join(folder, "volume.npy")
    np.save(volume_path, array)
    return {"type": "segment", "volume": volume_path, "ijkToRas": geometry.ijk_to_world.tolist(),
            "settings": dict({"prompt": "brain", "sam": sam, "clip": clip, "device": "cpu", "axis": "0"},
                             **settings)}


@pytest.fixture(scope="module")
def worker():
    engine = engine_worker()
    yield engine
    engine.stop()


@pytest.fixture
def mri():
    scene = new_scene()
    volume = np.stack([disk_image(size=40, center=(18, 21), radius=6 + i) for i in range(6)]).astype(np.int16)
    node = add_volume(scene, volume, OBLIQUE, "mri")
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "radiologist's work")
    bridge.write_mask_to_segment(target, node, blob(volume.shape, (2, 18, 21), (1, 3, 3)), "tumour", (1, 0, 0))
    return scene, node, target


def node_ids(scene):
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())
            if not scene.GetNthNode(n).IsA("vtkMRMLColorTableNode")]  # snapshot() adds colour tables


def test_progress_stream_mask_on_the_exact_geometry_and_models_kept(worker, mri, tmp_path, tiny_sam,
                                                                     tiny_sam_checkpoint, tiny_clip_option):
    scene, node, target = mri
    request = request_for(node, str(tmp_path), tiny_sam, tiny_clip_option, model_dir=str(tiny_sam_checkpoint.parent),
                          slices="1:5")
    events = []
    job = wait(worker, worker.submit(request, str(tmp_path / "run1")), events=events)
    assert job.state == jobs.DONE, job.error
    kinds = [event["event"] for event in events]
    assert kinds[0] == "ready" and kinds[1] == "loading" and kinds[-1] == "done"
    progress = [(event["done"], event["total"]) for event in events if event["event"] == "progress"]
    assert progress[-1] == (4, 4) and [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert len(progress) >= 4  # per slice, not only at the end

    # The child's mask becomes a preview on the volume's own voxel grid (an oblique, off-origin one).
    mask = bridge.load_result_mask(job.result["mask"], node, bridge.volume_geometry(node).shape)
    report = json.loads(Path(job.result["report"]).read_text())
    assert report["slice_range"] == [1, 5] and report["summary"]["voxels"] == int(mask.sum()) > 0
    assert not mask[0].any() and not mask[5].any()
    preview = bridge.create_preview(scene, node, mask, "Brain", (0.9, 0.8, 0.7))
    segment_id = preview.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(segment_array_on_reference(preview, segment_id, node), mask.astype(bool))
    labelmap = bridge.preview_to_labelmap(preview)
    matrix = __import__("vtk").vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(bridge._matrix_to_numpy(matrix), bridge.volume_geometry(node).ijk_to_ras, atol=1e-6)

    # A second Preview: the same process, the models not loaded again.
    pid = worker.process.pid
    second = wait(worker, worker.submit(request, str(tmp_path / "run2")))
    assert second.state == jobs.DONE and worker.process.pid == pid
    assert job.result["model_loads"] == second.result["model_loads"] == 1
    np.testing.assert_array_equal(np.load(second.result["mask"]), mask)


def test_cancel_kills_the_child_and_leaves_the_scene_as_it_was(mri, tmp_path, tiny_sam, tiny_sam_checkpoint,
                                                               tiny_clip_option):
    scene, node, target = mri
    engine = engine_worker()
    try:
        session = jobs.SessionRegistry().get("vtkMRMLSegmentEditorNode1")
        before = snapshot(target, node)  # (it adds display nodes of its own the first time)
        before_nodes = node_ids(scene)
        request = request_for(node, str(tmp_path), tiny_sam, tiny_clip_option,
                              model_dir=str(tiny_sam_checkpoint.parent), mode="every-slice")
        folder = tempfile.mkdtemp(dir=tmp_path)
        session.begin(engine.submit(request, folder), {"volume": node.GetID()})
        pid, log = engine.process.pid, engine.process.log_path
        wait(engine, session.job, until=lambda job: job.done >= 1)  # mid-run, after the first slice
        job, preview = session.end()
        engine.kill()
        assert job.state == jobs.CANCELLED and preview is None and not os.path.exists(folder)
        assert not os.path.exists(os.path.dirname(log))  # a cancelled child's log is not needed
        assert node_ids(scene) == before_nodes
        assert_same(before, snapshot(target, node))
        # The next Preview starts a fresh child.
        again = wait(engine, engine.submit(request, str(tmp_path / "again")))
        assert again.state == jobs.DONE and engine.process.pid != pid
    finally:
        engine.stop()


def test_a_child_that_dies_is_an_error_with_the_reason(mri, tmp_path, tiny_sam_checkpoint, tiny_clip_option):
    """crashing-sam exits its process with 137 on a 20-pixel-high slice, as the OOM killer would."""
    engine = engine_worker(TINY_MODELS_PLUGIN, CRASHING_MODEL_PLUGIN)
    try:
        scene = new_scene()
        node = add_volume(scene, np.stack([disk_image(size=20, center=(10, 10), radius=6)] * 3).astype(np.int16),
                          OBLIQUE, "bomb")
        request = request_for(node, str(tmp_path), "crashing-sam", tiny_clip_option,
                              model_dir=str(tiny_sam_checkpoint.parent))
        job = wait(engine, engine.submit(request, str(tmp_path / "out")))
        assert job.state == jobs.FAILED and job.error.kind == "Crashed"
        assert "exit code 137" in job.error.message and "out of memory" in job.error.message
        assert not engine.process.alive
        # The log stays until its tail has been shown; the next start (or the end) removes it.
        log = engine.process.log_path
        assert os.path.isfile(log)
        engine.ensure_started()
        assert not os.path.exists(os.path.dirname(log)) and os.path.isfile(engine.process.log_path)
        log = engine.process.log_path
    finally:
        engine.stop()
    assert not os.path.exists(os.path.dirname(log))


def test_engine_errors_come_back_as_events_and_the_worker_lives_on(worker, tmp_path, tiny_clip_option):
    request = {"type": "segment", "volume": str(tmp_path / "missing.npy"), "spacing": [1, 1, 1],
               "settings": {"prompt": "brain", "sam": "vit_b", "clip": tiny_clip_option, "device": "cpu",
                            "model_dir": str(tmp_path)}}
    np.save(tmp_path / "missing.npy", np.zeros((2, 8, 8), np.int16))
    job = wait(worker, worker.submit(request, str(tmp_path / "out")))
    assert job.state == jobs.FAILED and job.error.kind == "MissingWeightsError"
    assert "sam_vit_b" in job.error.message
    worker.process.send({"type": "nonsense", "id": 99})
    assert worker.process.alive
    bad = wait(worker, worker.submit(dict(request, volume=str(tmp_path / "absent.npy")), str(tmp_path / "o2")))
    assert bad.state == jobs.FAILED and "absent.npy" in bad.error.details


def test_stdout_noise_from_libraries_does_not_break_the_protocol(tmp_path, tiny_sam_checkpoint, tiny_clip_option):
    noisy = tmp_path / "noisy_plugin.py"
    noisy.write_text("import os, sys\nprint('hello from a library')\nos.write(1, b'C code says hi\\n')\n"
                     "sys.stdout.write('{\"event\": \"done\", \"id\": 1}\\n')\n")
    engine = engine_worker(TINY_MODELS_PLUGIN, noisy)
    try:
        scene = new_scene()
        node = add_volume(scene, np.stack([disk_image(size=24, center=(12, 12), radius=5)] * 2).astype(np.int16),
                          OBLIQUE, "small")
        job = wait(engine, engine.submit(request_for(node, str(tmp_path), "tiny-sam", tiny_clip_option,
                                                     model_dir=str(tiny_sam_checkpoint.parent)),
                                         str(tmp_path / "out")))
        assert job.state == jobs.DONE and os.path.exists(job.result["mask"])
        assert "hello from a library" in engine.process.log_tail() and "C code says hi" in engine.process.log_tail()
    finally:
        engine.stop()


# -- the reading side, without a process ---------------------------------------------------------


def test_line_buffer_joins_partial_lines_and_skips_noise():
    buffer = jobs.LineBuffer()
    assert buffer.feed(b'{"event": "progress", "done"') == []
    assert buffer.feed(b': 1, "total": 3}\nnot json\n\n{"event"') == ['{"event": "progress", "done": 1, "total": 3}',
                                                                      "not json"]
    assert buffer.feed(b': "done"}\n') == ['{"event": "done"}']
    assert jobs.parse_event("not json") is None and jobs.parse_event("[1]") is None
    assert jobs.parse_event('{"event": "ready"}') == {"event": "ready"}


def test_find_python_slicer_as_slicer_does(tmp_path):
    assert jobs.find_python_slicer(which=lambda name: "/opt/Slicer/bin/PythonSlicer") == "/opt/Slicer/bin/PythonSlicer"
    home = tmp_path / "Slicer-5.10.0"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "PythonSlicer").write_text("")
    found = jobs.find_python_slicer(which=lambda name: None, executable=str(tmp_path / "x" / "Slicer"),
                                    slicer_home=str(home))
    assert found == str(home / "bin" / "PythonSlicer")
    with pytest.raises(FileNotFoundError, match="PythonSlicer"):
        jobs.find_python_slicer(which=lambda name: None, executable=str(tmp_path / "x" / "Slicer"))
    env = jobs.worker_environment({"PYTHONPATH": os.pathsep.join(["/a", "/engine"])}, "/engine")
    assert env["PYTHONPATH"].split(os.pathsep) == ["/engine", "/a"]


def test_the_child_sees_the_volume_on_its_own_oblique_grid(mri, tmp_path):
    """Not only its spacing: left/right presets decide the patient's side from the grid's direction."""
    from SaLIPSegmentLib.worker import image_from_request

    _, node, _ = mri
    request = request_for(node, str(tmp_path), "litemedsam", "oracle")
    image = image_from_request(request)
    ijk_to_ras = bridge.volume_geometry(node).ijk_to_ras
    np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras, image.ijk_to_lps, atol=1e-9)
    np.testing.assert_allclose(image.spacing, node.GetSpacing())
    assert not np.allclose(image.direction, np.eye(3))  # the fixture's grid is oblique
    np.testing.assert_array_equal(image.array, bridge.volume_to_numpy(node)[0])

    request["ijkToRas"] = np.zeros((4, 4)).tolist()
    with pytest.raises(InputError, match="degenerate"):
        image_from_request(request)


def test_a_correction_reuses_the_kept_preview_and_taking_a_hint_away_brings_the_automatic_pass_back(
        worker, mri, tmp_path, tiny_sam, tiny_sam_checkpoint, tiny_clip_option):
    scene, node, target = mri
    early = wait(worker, worker.submit({"type": "correct", "hints": []}, str(tmp_path / "none")))
    assert early.state == jobs.FAILED and early.error.kind == "InputError" and "Preview first" in early.error.message

    request = dict(request_for(node, str(tmp_path), tiny_sam, tiny_clip_option,
                               model_dir=str(tiny_sam_checkpoint.parent)), keep_session=True)
    preview = wait(worker, worker.submit(request, str(tmp_path / "preview")))
    assert preview.state == jobs.DONE, preview.error
    automatic = np.load(preview.result["mask"])
    assert automatic[3].any()

    fixed = wait(worker, worker.submit({"type": "correct", "hints": [{"slice": 3, "absent": True}]},
                                       str(tmp_path / "fix1")))
    assert fixed.state == jobs.DONE, fixed.error
    correction = fixed.result["correction"]
    assert correction["hinted"] == [3] and correction["encodings"] == 0  # every slice's encoding was kept
    mask = np.load(fixed.result["mask"])
    assert not mask[3].any()
    untouched = [k for k in range(6) if k not in correction["changed"]]
    np.testing.assert_array_equal(mask[untouched], automatic[untouched])
    report = json.loads(Path(fixed.result["report"]).read_text())
    assert report["hints"] == [{"slice": 3, "absent": True}] and report["slices"][3]["method"] == "hint"

    # Stopped (the effect's Cancel during an Update): the kept run stays as this result showed it, even
    # where the stopped request had taken the automatic pass back first (a hint removed).
    stopped_folder = tmp_path / "stopped"
    stopped_folder.mkdir()
    (stopped_folder / jobs.STOP_FILE).touch()
    stopped = wait(worker, worker.submit({"type": "correct", "hints": []}, str(stopped_folder)))
    assert stopped.state == jobs.CANCELLED and not (stopped_folder / "mask.npy").exists()
    same = wait(worker, worker.submit({"type": "correct", "hints": [{"slice": 3, "absent": True}]},
                                      str(tmp_path / "same")))
    assert same.state == jobs.DONE and same.result["correction"]["hinted"] == []  # nothing new to apply
    np.testing.assert_array_equal(np.load(same.result["mask"]), mask)

    bad = wait(worker, worker.submit({"type": "correct", "hints": [{"slice": 9, "absent": True}]},
                                     str(tmp_path / "bad")))
    assert bad.state == jobs.FAILED and "outside the run's slices 0:6" in bad.error.message

    undone = wait(worker, worker.submit({"type": "correct", "hints": []}, str(tmp_path / "fix2")))
    assert undone.state == jobs.DONE and undone.result["correction"]["encodings"] == 0
    np.testing.assert_array_equal(np.load(undone.result["mask"]), automatic)
    assert undone.result["model_loads"] == preview.result["model_loads"]
