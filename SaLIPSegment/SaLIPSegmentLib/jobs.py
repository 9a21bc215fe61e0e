"""Long work that the GUI polls from a timer: progress, cancel, result or error. No Qt, no Slicer.

* `WorkerProcess`, `EngineWorker`, `PreviewJob`: the engine in a child process, as the effect
  runs it inside Slicer (see the note above `WORKER_MODULE`).
* `WeightsDownload`, `DownloadJob`: the settings panel's download, in a child process of its own.
* `PreviewSession`, `SESSIONS`: a Segment Editor's running job and preview, kept outside the
  effect object so that they survive its deactivation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# -- the engine in a child process ------------------------------------------------------------
#
# Inside Slicer a Python thread only runs while Slicer's main thread runs Python (PythonQt keeps
# the GIL), so the effect's engine runs in a child process instead (`worker.py`). What follows is
# the effect's side of it, without Qt: start the child, send JSON requests, read its JSON lines
# with non-blocking reads (the effect calls `poll` from a QTimer), kill it on Cancel.

WORKER_MODULE = "SaLIPSegmentLib.worker"
LOG_TAIL_CHARS = 4000
READ_CHUNK = 65536


def find_python_slicer(which: Callable[[str], Optional[str]] = None, executable: Optional[str] = None,
                       slicer_home: Optional[str] = None) -> str:
    """Slicer's own Python: `PythonSlicer` on PATH (Slicer's launcher puts it there), next to the
    running executable, or in `<slicer home>/bin`; as slicer.util._executePythonModule finds it."""
    import shutil

    which = which or shutil.which
    found = which("PythonSlicer")
    if found:
        return found
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    folders = [os.path.dirname(executable or sys.executable)]
    if slicer_home:
        folders.append(os.path.join(slicer_home, "bin"))
    for folder in folders:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"Slicer's Python ({name}) was not found on PATH or in {', '.join(folders)}.")


def worker_command(python: str) -> List[str]:
    return [python, "-u", "-m", WORKER_MODULE]


def worker_environment(base: Dict[str, str], engine_parent: str) -> Dict[str, str]:
    """The parent's environment with the engine's folder first on PYTHONPATH."""
    env = dict(base)
    paths = [engine_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != engine_parent]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LineBuffer:
    """Bytes in, complete text lines out; a partial last line waits for the rest."""

    def __init__(self):
        self._pending = b""

    def feed(self, data: bytes) -> List[str]:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        return [line.decode("utf-8", "replace").strip() for line in lines if line.strip()]


def parse_event(line: str) -> Optional[dict]:
    """A protocol event, or None for a line that is not one (the child's stdout is protocol only,
    but a stray line must not stop the effect)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


class WorkerProcess:
    """The child process: JSON requests to its stdin, JSON events from its stdout, stderr to a log file."""

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None, log_path: Optional[str] = None):
        self.command = list(command)
        self.env = env
        # A log folder of our own is removed once the log is no longer needed (discard_log); a
        # caller's log_path is the caller's to keep.
        self._log_folder = None if log_path else tempfile.mkdtemp(prefix="salip-worker-")
        self.log_path = log_path or os.path.join(self._log_folder, "worker.log")
        self._process: Optional[subprocess.Popen] = None
        self._buffer = LineBuffer()
        self.ready: Optional[dict] = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        os.set_blocking(self._process.stdout.fileno(), False)
        return self

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    def send(self, request: dict) -> None:
        if not self.alive:
            raise WorkerDied(self.describe_exit())
        try:
            self._process.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise WorkerDied(self.describe_exit()) from error

    def read_events(self) -> List[dict]:
        """Whatever complete events the child has written so far; never blocks."""
        if self._process is None:
            return []
        stream, events = self._process.stdout, []
        while True:
            try:
                data = os.read(stream.fileno(), READ_CHUNK)
            except BlockingIOError:
                break
            except (OSError, ValueError):  # closed after a kill
                break
            if not data:
                break
            for line in self._buffer.feed(data):
                event = parse_event(line)
                if event is not None:
                    if event["event"] == "ready":
                        self.ready = event
                    events.append(event)
        return events

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - chars))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def discard_log(self) -> None:
        """Remove the log folder this process made, once its tail has been shown or was not needed."""
        if self._log_folder is not None and not self.alive:
            shutil.rmtree(self._log_folder, ignore_errors=True)
            self._log_folder = None

    def describe_exit(self) -> str:
        code = self.returncode
        if code is None:
            return "The SaLIP worker process is not running."
        text = f"The SaLIP worker process stopped (exit code {code})."
        if code in (-9, 137):  # SIGKILL, as the kernel's out-of-memory killer sends it
            text += " The system probably ran out of memory: try fewer slices or a smaller model."
        return text

    def kill(self, timeout: float = 10.0) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for stream in (self._process.stdin, self._process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to exit (closing its stdin), then kill it if it does not."""
        if self.alive:
            try:
                self.send({"type": "exit"})
                self._process.stdin.close()
                self._process.wait(timeout)
            except (WorkerDied, subprocess.TimeoutExpired, OSError):
                pass
        self.kill()


class WorkerDied(RuntimeError):
    """The child process ended while the effect needed it."""


# -- one Preview, and the state that outlives the effect's panel -------------------------------


RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


@dataclass
class JobError:
    kind: str
    message: str
    details: str = ""


@dataclass
class PreviewJob:
    """One request to the worker and what has come back for it."""

    request_id: int
    folder: str
    state: str = RUNNING
    done: int = 0
    total: int = 0
    loading: bool = True
    notices: List[str] = field(default_factory=list)
    result: Optional[dict] = None
    error: Optional[JobError] = None
    started: float = field(default_factory=time.monotonic)
    finished_at: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    @property
    def cancelled(self) -> bool:
        return self.state == CANCELLED

    def handle(self, event: dict) -> None:
        """Update from one event of the child's stream (events of other requests are ignored)."""
        if self.finished or event.get("id", self.request_id) != self.request_id:
            return
        kind = event["event"]
        if kind == "progress":
            self.on_progress(event)
        elif kind == "notice":
            self.notices.append(str(event.get("text", "")))
        elif kind == "done":
            self.result = event
            self._finish(DONE)
        elif kind == "error":
            self.error = JobError(str(event.get("kind", "Exception")), str(event.get("message", "")),
                                  str(event.get("details", "")))
            self._finish(CANCELLED if self.error.kind == "Cancelled" else FAILED)

    def on_progress(self, event: dict) -> None:
        self.loading = False
        self.done, self.total = int(event["done"]), int(event["total"])

    def fail(self, kind: str, message: str, details: str = "") -> None:
        if not self.finished:
            self.error = JobError(kind, message, details)
            self._finish(FAILED)

    def cancel(self) -> None:
        if not self.finished:
            self._finish(CANCELLED)

    def _finish(self, state: str) -> None:
        self.state = state
        self.finished_at = time.monotonic()

    @property
    def seconds(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started


class EngineWorker:
    """The one persistent worker of this Slicer process: started on first use, restarted after a
    crash or a Cancel (which kills it), sent one request at a time."""

    def __init__(self, command_factory: Callable[[], Sequence[str]], env_factory: Callable[[], Dict[str, str]]):
        self._command_factory = command_factory
        self._env_factory = env_factory
        self.process: Optional[WorkerProcess] = None
        self._next_id = 0
        self.starts = 0

    def ensure_started(self) -> WorkerProcess:
        if self.process is None or not self.process.alive:
            if self.process is not None:  # a crash's log tail was shown when its job failed
                self.process.kill()
                self.process.discard_log()
            self.process = WorkerProcess(self._command_factory(), self._env_factory()).start()
            self.starts += 1
        return self.process

    def submit(self, request: dict, folder: str) -> PreviewJob:
        process = self.ensure_started()
        self._next_id += 1
        job = PreviewJob(self._next_id, folder)
        process.send(dict(request, id=job.request_id, output=folder))
        return job

    def poll(self, job: Optional[PreviewJob]) -> List[dict]:
        """Read the child's events into `job`; a child that died mid-job fails it with the reason."""
        if self.process is None:
            return []
        return poll_process(self.process, job)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.discard_log()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process.discard_log()
            self.process = None


def poll_process(process: WorkerProcess, job: Optional[PreviewJob]) -> List[dict]:
    """The child's new events, handed to `job`; a child that died mid-job fails it with the reason."""
    events = process.read_events()
    for event in events:
        if job is not None:
            job.handle(event)
    if job is not None and not job.finished and not process.alive:
        events += process.read_events()  # the last lines it wrote before it ended
        for event in events:
            job.handle(event)
        if not job.finished:
            job.fail("Crashed", process.describe_exit(), process.log_tail())
    return events


# -- the settings panel's download --------------------------------------------------------------


@dataclass
class DownloadJob(PreviewJob):
    """A download request: `done` and `total` are bytes of file `file` (0-based) of `files`."""

    file: int = 0
    files: int = 0
    name: str = ""
    filename: str = ""

    def on_progress(self, event: dict) -> None:
        self.loading = False
        self.file, self.files = int(event.get("file", 0)), int(event.get("files", 0))
        self.name, self.filename = str(event.get("name", "")), str(event.get("filename", ""))
        self.done, self.total = int(event["done"]), int(event.get("total") or 0)

    @property
    def paths(self) -> List[str]:
        return list((self.result or {}).get("paths", []))


class WeightsDownload:
    """Weights fetched by a child process of their own (`worker.py`'s download request).

    Inside Slicer a download thread would crawl as the engine would (PythonQt keeps the GIL).
    Cancel kills the child and removes its temporary file (named after its pid, see
    weights.partial_prefix); files it finished were renamed into place whole and stay.
    """

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]], files: Sequence[dict],
                 model_dir: Optional[str] = None):
        self.files = [dict(item) for item in files]
        self.process = WorkerProcess(command, env)
        self.job = DownloadJob(1, folder="", files=len(self.files))
        self._model_dir = model_dir
        self.removed: List[str] = []

    def start(self) -> WeightsDownload:
        self.process.start()
        self.process.send({"type": "download", "id": self.job.request_id, "files": self.files,
                           "model_dir": self._model_dir})
        self.process.send({"type": "exit"})  # the child ends once the download is over
        return self

    @property
    def finished(self) -> bool:
        return self.job.finished

    def poll(self) -> List[dict]:
        events = poll_process(self.process, self.job)
        if self.job.state == DONE:
            self.process.stop(timeout=5.0)  # it was told to exit after the download: a moment at most
        elif self.job.finished:
            self._end()
        if self.job.finished:  # a failure's log tail is in the job by now
            self.process.discard_log()
        return events

    def cancel(self) -> None:
        self.job.cancel()
        self._end()

    def _end(self) -> None:
        """Kill the child (if it still runs) and delete what it left half-written."""
        from .models import weights

        self.process.kill()
        if self.process.pid is not None:
            for item in self.files:
                self.removed += [str(path) for path in weights.remove_partials(str(item["filename"]), self.process.pid)]
        self.process.discard_log()


STOP_FILE = "stop"
"""A file of this name in a correct request's output folder asks the engine to stop that request."""


@dataclass
class PreviewSession:
    """What one Segment Editor (its parameter node) has going: the running job and the preview.

    Held outside the effect object, so that deactivating and reactivating the effect, switching
    modules or placing a markup keep both; only Cancel, a new Preview, Apply or closing the
    scene end them (`end`).
    """

    key: str
    job: Optional[PreviewJob] = None
    run: Optional[dict] = None
    """What the effect needs to turn the job's result into a preview (node IDs, prompt, geometry)."""
    preview_node_id: Optional[str] = None
    status: str = ""
    report: Optional[dict] = None
    """The last result's report (per-slice table, flags): the next slice to fix comes from it."""
    hints: Optional[object] = None
    """effect_hints.HintList of this preview, from its first result on."""
    correcting: bool = False
    """Whether `job` is an Update (a correct request on the engine's kept run) rather than a Preview."""
    corrections: int = 0
    _sent: Dict[int, dict] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.finished

    def begin(self, job: PreviewJob, run: dict) -> None:
        self.job, self.run, self.preview_node_id, self.status = job, run, None, ""
        self.report, self.hints, self.correcting, self.corrections = None, None, False, 0

    def begin_correction(self, job: PreviewJob) -> None:
        """An Update: the run and the preview stay; what it sent is what the result will have applied."""
        self.job, self.correcting, self.corrections = job, True, self.corrections + 1
        self._sent = {k: dict(v) for k, v in self.hints.hints.items()}

    def finish_correction(self, report: dict, applied: bool) -> None:
        """A result came back (a Preview's or an Update's): keep its report; start or update the hint list."""
        from .effect_hints import HintList

        self.report, self.correcting = report, False
        if self.hints is None:
            self.hints = HintList(axis=int(report["axis"]), slice_range=tuple(report["slice_range"]),
                                  shape_kji=tuple((self.run or {}).get("shape") or ()),
                                  takes_points=bool(report.get("takes_points")),
                                  segmenter_name=str(report.get("sam") or "this segmenter"))
        elif applied:
            self.hints.applied = self._sent

    def stop_correction(self) -> bool:
        """Ask the engine to stop the running Update (STOP_FILE in its output folder) without ending the
        engine: the kept run and the preview stay as they were before it (corrections.CorrectionSession
        undoes a correction stopped half-way). False when no Update runs or one was asked to stop already."""
        if not (self.running and self.correcting) or self.job.folder == "":
            return False
        stop = os.path.join(self.job.folder, STOP_FILE)
        if os.path.exists(stop):
            return False
        os.makedirs(self.job.folder, exist_ok=True)
        with open(stop, "w", encoding="utf-8"):
            pass
        return True

    def end(self) -> Tuple[Optional[PreviewJob], Optional[str]]:
        """Forget the job and the preview; returns them so that the caller can kill and remove them."""
        job, preview = self.job, self.preview_node_id
        if job is not None:
            job.cancel()
            remove_folder(job.folder)
        remove_folder((self.run or {}).get("folder"))
        self.job, self.run, self.preview_node_id = None, None, None
        self.report, self.hints, self.correcting = None, None, False
        return job, preview


class SessionRegistry:
    """Sessions by key (the segment editor parameter node's ID)."""

    def __init__(self):
        self._sessions: Dict[str, PreviewSession] = {}

    def get(self, key: str) -> PreviewSession:
        if key not in self._sessions:
            self._sessions[key] = PreviewSession(key)
        return self._sessions[key]

    def running(self) -> List[PreviewSession]:
        return [session for session in self._sessions.values() if session.running]

    def end_all(self) -> List[Tuple[Optional[PreviewJob], Optional[str]]]:
        """Scene closed: every session ends (their nodes are gone with the scene)."""
        ended = [session.end() for session in self._sessions.values()]
        self._sessions.clear()
        return ended


def remove_folder(folder: Optional[str]) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


SESSIONS = SessionRegistry()
"""Module-level: the effect object may be deactivated, cloned or rebuilt; the sessions stay."""


_ENGINE: Optional[EngineWorker] = None


def shared_engine(command_factory: Callable[[], Sequence[str]],
                  env_factory: Callable[[], Dict[str, str]]) -> EngineWorker:
    """The one engine process of this application (the effect's models stay loaded in it)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = EngineWorker(command_factory, env_factory)
    return _ENGINE


def end_all_sessions() -> List[Tuple[Optional[PreviewJob], Optional[str]]]:
    """The scene closed: every session ends, and a running job's engine process is killed."""
    running = bool(SESSIONS.running())
    ended = SESSIONS.end_all()
    if running and _ENGINE is not None:
        _ENGINE.kill()
    return ended
