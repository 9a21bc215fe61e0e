"""The effect's Preview state and the settings panel's download state, which are Qt-free."""

import types

# -- the effect's Preview state: one job per Segment Editor, outliving the effect object ----------


def test_a_preview_job_follows_its_own_events_only():
    from SaLIPSegmentLib import jobs

    job = jobs.PreviewJob(3, folder="")
    job.handle({"event": "ready", "pid": 1})
    job.handle({"event": "progress", "id": 2, "done": 5, "total": 9})  # an earlier request's line
    assert (job.done, job.total, job.loading) == (0, 0, True)
    job.handle({"event": "progress", "id": 3, "done": 1, "total": 4})
    job.handle({"event": "notice", "id": 3, "text": "Adapted proposal settings"})
    assert (job.done, job.total, job.loading, job.notices) == (1, 4, False, ["Adapted proposal settings"])
    job.handle({"event": "done", "id": 3, "mask": "m.npy", "report": "r.json"})
    assert job.state == jobs.DONE and job.result["mask"] == "m.npy"
    job.handle({"event": "error", "id": 3, "kind": "Exception", "message": "late"})  # finished: ignored
    job.cancel()
    assert job.state == jobs.DONE and job.error is None

    failed = jobs.PreviewJob(4, folder="")
    failed.handle({"event": "error", "id": 4, "kind": "MissingWeightsError", "message": "sam_vit_b_01ec64.pth"})
    assert failed.state == jobs.FAILED and failed.error.kind == "MissingWeightsError"
    cancelled = jobs.PreviewJob(5, folder="")
    cancelled.handle({"event": "error", "id": 5, "kind": "Cancelled", "message": "stopped"})
    assert cancelled.state == jobs.CANCELLED


def test_sessions_survive_until_ended_and_end_their_files(tmp_path):
    from SaLIPSegmentLib import jobs

    registry = jobs.SessionRegistry()
    session = registry.get("vtkMRMLSegmentEditorNode1")
    run_folder = tmp_path / "run"
    (run_folder / "result").mkdir(parents=True)
    session.begin(jobs.PreviewJob(1, str(run_folder / "result")), {"folder": str(run_folder)})
    # The effect object asks again later (reactivated, another clone): the same session, still running.
    assert registry.get("vtkMRMLSegmentEditorNode1") is session and session.running
    assert registry.get("vtkMRMLSegmentEditorNode2") is not session
    assert registry.running() == [session]
    session.job.handle({"event": "done", "id": 1, "mask": "m", "report": "r"})
    session.preview_node_id = "vtkMRMLSegmentationNode7"
    assert not session.running and registry.get("vtkMRMLSegmentEditorNode1").preview_node_id == session.preview_node_id
    job, preview = session.end()  # Apply, Cancel or a new Preview
    assert job.state == jobs.DONE and preview == "vtkMRMLSegmentationNode7"
    assert session.job is None and session.run is None and session.preview_node_id is None
    assert not run_folder.exists()


def test_closing_the_scene_ends_every_session_and_kills_a_running_engine(tmp_path, monkeypatch):
    import sys

    from SaLIPSegmentLib import jobs

    registry = jobs.SessionRegistry()
    monkeypatch.setattr(jobs, "SESSIONS", registry)
    engine = jobs.EngineWorker(lambda: [sys.executable, "-c", "import time; time.sleep(120)"], lambda: None)
    monkeypatch.setattr(jobs, "_ENGINE", engine)
    running = registry.get("a")
    running.begin(engine.submit({"type": "segment"}, str(tmp_path / "a")), {})
    finished = registry.get("b")
    finished.begin(jobs.PreviewJob(9, str(tmp_path / "b")), {})
    finished.job.handle({"event": "done", "id": 9})
    finished.preview_node_id = "vtkMRMLSegmentationNode3"
    process = engine.process
    assert process.alive
    ended = jobs.end_all_sessions()
    assert sorted(preview or "" for _job, preview in ended) == ["", "vtkMRMLSegmentationNode3"]
    assert not process.alive and registry.running() == [] and engine.process is None


# -- the settings panel's download ---------------------------------------------------------------


def test_a_download_job_follows_bytes_per_file():
    from SaLIPSegmentLib import jobs

    job = jobs.DownloadJob(1, folder="", files=2)
    job.handle({"event": "progress", "id": 1, "file": 1, "files": 2, "name": "clip", "filename": "c.bin",
                "done": 300, "total": 0})
    assert (job.file, job.files, job.filename, job.done, job.total) == (1, 2, "c.bin", 300, 0)
    job.handle({"event": "done", "id": 1, "paths": ["/cache/a.pth", "/cache/c.bin"]})
    assert job.state == jobs.DONE and job.paths == ["/cache/a.pth", "/cache/c.bin"] and not job.cancelled


def test_cancel_during_an_update_asks_the_engine_to_stop_it_once_and_never_a_preview(tmp_path):
    from SaLIPSegmentLib import jobs

    session = jobs.SessionRegistry().get("vtkMRMLSegmentEditorNode1")
    session.begin(jobs.PreviewJob(1, str(tmp_path / "run" / "result")), {"folder": str(tmp_path / "run")})
    assert not session.stop_correction(), "a running Preview is ended by killing the engine, not stopped"
    session.job.handle({"event": "done", "id": 1, "mask": "m", "report": "r"})
    session.hints = types.SimpleNamespace(hints={3: {"slice": 3, "absent": True}})
    update = jobs.PreviewJob(2, str(tmp_path / "run" / "correction1"))
    session.begin_correction(update)
    assert session.stop_correction()
    assert (tmp_path / "run" / "correction1" / jobs.STOP_FILE).exists()
    assert not session.stop_correction(), "asked once: a second Cancel ends the session instead"
    update.handle({"event": "error", "id": 2, "kind": "Cancelled", "message": "stopped"})
    assert not session.running and not session.stop_correction()
