"""The settings panel's weights download in a child process, end to end against a local server.

What the panel does, minus Qt: a `python -m SaLIPSegmentLib.worker` child gets a download
request, its JSON progress lines (bytes per file) are read with non-blocking reads, files land
in the cache checked against their SHA256, and Cancel kills the child and leaves no partial
file. Inside Slicer a download thread would crawl (PythonQt keeps the GIL), hence the process.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

from SaLIPSegmentLib import jobs
from SaLIPSegmentLib.models.weights import cache_dir

from conftest import DIGEST, PAYLOAD

ENGINE_PARENT = str(Path(__file__).resolve().parents[1] / "SaLIPSegment")
DEADLINE_S = 60


def start(files, model_dir=None) -> jobs.WeightsDownload:
    env = jobs.worker_environment(dict(os.environ), ENGINE_PARENT)  # SALIP_CACHE_DIR: this test's cache
    return jobs.WeightsDownload(jobs.worker_command(sys.executable), env, files, model_dir).start()


def entry(name, url, sha256=DIGEST, size=None):
    return {"name": name, "filename": f"{name}.pth", "url": url, "sha256": sha256, "size_bytes": size}


def follow(download, until=lambda download: download.finished):
    events = []
    deadline = time.monotonic() + DEADLINE_S
    while not until(download):
        assert time.monotonic() < deadline, f"no answer from the download process:\n{download.process.log_tail()}"
        events += download.poll()
        time.sleep(0.02)
    return events


def cache_files():
    folder = cache_dir()
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def test_files_land_in_the_cache_checked_with_bytes_progress_per_file(server):
    download = start([entry("first", f"{server}/good.pth"), entry("second", f"{server}/moved.pth")])
    events = follow(download)
    assert download.job.state == jobs.DONE, download.job.error
    assert download.process.pid != os.getpid() and not download.process.alive  # a child, gone when done
    assert not os.path.exists(os.path.dirname(download.process.log_path))  # and so is its log folder
    progress = [event for event in events if event["event"] == "progress"]
    assert {(event["file"], event["files"], event["filename"]) for event in progress} == {
        (0, 2, "first.pth"), (1, 2, "second.pth")}
    for index in (0, 1):
        done = [event["done"] for event in progress if event["file"] == index]
        assert done[0] == 0 and done[-1] == len(PAYLOAD) and done == sorted(done)
        assert [event["total"] for event in progress if event["file"] == index][-1] == len(PAYLOAD)
    assert download.job.paths == [str(cache_dir() / "first.pth"), str(cache_dir() / "second.pth")]
    for name in ("first.pth", "second.pth"):
        assert hashlib.sha256((cache_dir() / name).read_bytes()).hexdigest() == DIGEST
    assert cache_files() == ["first.pth", "second.pth"]


def test_cancel_mid_download_kills_the_child_and_leaves_no_partial_file(server):
    download = start([entry("first", f"{server}/good.pth"), entry("stalled", f"{server}/stall.pth")])
    follow(download, until=lambda d: d.job.file == 1 and d.job.done > 0)  # half of the second file is in
    partial = [name for name in cache_files() if name.endswith(".part")]
    assert partial and partial[0].startswith(f".stalled.pth.{download.process.pid}."), cache_files()
    download.cancel()
    assert download.job.cancelled and not download.process.alive
    assert [Path(path).name for path in download.removed] == partial
    assert cache_files() == ["first.pth"]  # the finished file stays, nothing half-written does
    download.poll()  # a late poll changes nothing
    assert download.job.cancelled and cache_files() == ["first.pth"]


def test_a_bad_checksum_is_an_error_event_and_nothing_is_kept(server):
    download = start([entry("tampered", f"{server}/good.pth", sha256="0" * 64)])
    follow(download)
    assert download.job.state == jobs.FAILED
    assert download.job.error.kind == "SalipError" and "SHA256" in download.job.error.message
    assert cache_files() == []


def test_an_unreachable_address_is_an_error_event(server):
    with socket.socket() as probe:  # a port on 127.0.0.1 that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    download = start([entry("nowhere", f"http://127.0.0.1:{port}/nowhere.pth")])
    follow(download)
    assert download.job.state == jobs.FAILED and download.job.error.kind == "MissingWeightsError"
    assert "nowhere.pth" in download.job.error.message and cache_files() == []


def test_a_file_already_in_the_model_folder_is_not_downloaded_again(server, tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "present.pth").write_bytes(PAYLOAD)
    download = start([entry("present", f"{server}/stall.pth")], model_dir=str(model_dir))
    follow(download)
    assert download.job.state == jobs.DONE and download.job.paths == [str(model_dir / "present.pth")]
    assert cache_files() == []


def test_a_child_that_dies_mid_download_is_an_error_and_leaves_no_partial_file(server):
    """A crash or the out-of-memory killer: the panel says so, and the half file goes too."""
    download = start([entry("stalled", f"{server}/stall.pth")])
    follow(download, until=lambda d: d.job.done > 0)
    assert any(name.endswith(".part") for name in cache_files())
    os.kill(download.process.pid, signal.SIGKILL)
    follow(download)
    assert download.job.state == jobs.FAILED and download.job.error.kind == "Crashed"
    assert "exit code -9" in download.job.error.message and cache_files() == []
    assert not os.path.exists(os.path.dirname(download.process.log_path))  # its tail is in the error
