"""The engine as a child process that Slicer's effect talks to: `PythonSlicer -m SaLIPSegmentLib.worker`.

Inside Slicer the engine must not run on a Python thread of Slicer's own process (PythonQt
keeps the GIL on the main thread, so such a thread crawls), and a crash or out-of-memory
there would take Slicer down. So the effect starts this module once and keeps it: the
models stay loaded between Previews.

Line protocol, one JSON object per line:

* requests on stdin: ``{"type": "segment", "id": 1, "volume": "/tmp/v.npy", "ijkToRas": [[..] x 4],
  "output": "/tmp/out", "settings": {...}}`` (see :func:`settings_from_request`),
  ``{"type": "correct", "id": 3, "hints": [...], "output": "/tmp/out2"}`` (the hints now in force, in
  hints.py's schema: the last segment request that said ``"keep_session": true`` is corrected, its
  slices' embeddings reused; see pipeline.correct_kept; a file named jobs.STOP_FILE appearing in its
  output folder stops it, and the kept run stays as it was),
  ``{"type": "download", "id": 2, "files": [{"name", "filename", "url", "sha256", "size_bytes"}],
  "model_dir": ...}`` (the settings panel's weights, into the cache) or ``{"type": "exit"}``;
* events on stdout: ``ready``, then per request ``loading``, ``progress`` (``done``, ``total``;
  for a download, bytes of file ``file`` of ``files``), ``notice`` and finally ``done``
  (``mask``, ``report`` paths; ``paths`` of a download) or ``error`` (``kind``, ``message``,
  ``details``).

The run goes through `pipeline.segment_image`, the path `salip segment` takes (settings,
propagation, clean-up, adaptation, report). Anything the engine or a library prints goes to
stderr: stdout carries protocol lines only.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, TextIO, Tuple

import numpy as np

from .errors import Cancelled, InputError, MissingWeightsError, SalipError
from .jobs import STOP_FILE

PROTOCOL_VERSION = 1
MASK_FILE = "mask.npy"
REPORT_FILE = "report.json"
# A weight-free scorer for Slicer's self-test (no CLIP weights can be assumed where it runs):
# the largest candidate wins. It checks the plumbing, not retrieval.
LARGEST_CANDIDATE_SCORER = "largest-candidate"


# -- settings ---------------------------------------------------------------------------------


def settings_from_request(values: dict):
    """`pipeline.SegmentSettings` from a request's plain values, validated as the command line does."""
    from .models import get_segmenter_spec
    from .models.base import ProposalSettings
    from .pipeline import SegmentSettings
    from .prompts import resolve_prompt
    from .settings import CleanupSettings

    prompt = resolve_prompt(str(values.get("prompt", "")))
    top_k = int(values.get("top_k") or prompt.top_k)
    if top_k < 1:
        raise InputError("Top-k must be at least 1.")
    sam = str(values["sam"])
    proposal = dict(get_segmenter_spec(sam).proposal_defaults)
    proposal.update(values.get("proposal") or {})
    window = values.get("window")
    return SegmentSettings(
        prompt=prompt, top_k=top_k, sam=sam, clip=str(values["clip"]), proposal=ProposalSettings.from_dict(proposal),
        model_dir=values.get("model_dir") or None, device=str(values.get("device", "auto")),
        axis=str(values.get("axis", "auto")), slices=values.get("slices"),
        window=(float(window[0]), float(window[1])) if window else None,
        mode=str(values.get("mode", "propagate")), adapt=bool(values.get("adapt", False)),
        keep_largest=bool(values.get("keep_largest", False)),
        fill_holes=bool(values.get("fill_holes", CleanupSettings.fill_holes)),
        fill_flagged=bool(values.get("fill_flagged", False)), shape=_shape(values.get("shape")),
    )


def _shape(values):
    """The request's shape steps (a dict of settings.ShapeSettings fields); the defaults where it has none."""
    from dataclasses import fields

    from .settings import ShapeSettings

    known = {f.name for f in fields(ShapeSettings)}
    unknown = set(values or {}) - known
    if unknown:
        raise InputError(f"Unknown shape settings: {', '.join(sorted(unknown))}")
    return ShapeSettings(**(values or {}))


def image_from_request(request: dict):
    """The volume the effect wrote (numpy `(k, j, i)`) on its grid: `ijkToRas`, else `spacing` along i, j, k."""
    from .io import Image3D, image_from_ijk_to_ras

    array = np.load(request["volume"], allow_pickle=False)
    if array.ndim != 3:
        raise InputError(f"The volume file holds a {array.ndim}-D array, not 3-D.")
    if request.get("ijkToRas") is not None:
        return image_from_ijk_to_ras(array, request["ijkToRas"], source=str(request["volume"]))
    spacing = tuple(float(s) for s in request.get("spacing") or (1.0, 1.0, 1.0))
    return Image3D(array=array, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3),
                   source=str(request["volume"]))


# -- models -----------------------------------------------------------------------------------


def largest_candidate_scorer():
    """Scores each candidate by its area (see LARGEST_CANDIDATE_SCORER)."""
    from .models.base import Scorer

    class LargestCandidateScorer(Scorer):
        name = LARGEST_CANDIDATE_SCORER

        def score(self, image_rgb, candidates, sentences, reference=None):
            return np.asarray([candidate.area for candidate in candidates], dtype=np.float64)

    return LargestCandidateScorer()


@dataclass
class LoadedModels:
    """The models of the last request, kept for the next one when nothing about them changed."""

    key: Optional[Tuple] = None
    models: Optional[Tuple] = None
    loads: int = 0

    def get(self, settings):
        from .models import resolve_device
        from .pipeline import load_models

        key = (settings.sam, settings.clip, settings.device, settings.model_dir, settings.precision)
        if key != self.key or self.models is None:
            self.models = None  # free the old ones before loading the new
            device = resolve_device(settings.device)
            scorer_name = "oracle" if settings.clip == LARGEST_CANDIDATE_SCORER else settings.clip
            segmenter, scorer = load_models(settings.sam, scorer_name, device, model_dir=settings.model_dir,
                                            progress=False, precision=settings.precision)
            if settings.clip == LARGEST_CANDIDATE_SCORER:
                scorer = largest_candidate_scorer()
            self.key, self.models, self.loads = key, (segmenter, scorer), self.loads + 1
        return self.models

    def clear(self) -> None:
        self.key, self.models = None, None


# -- one request ------------------------------------------------------------------------------


@dataclass
class Worker:
    """Answers requests one at a time, writing events through `emit`."""

    emit: Callable[[dict], None]
    models: LoadedModels = field(default_factory=LoadedModels)
    kept: Optional[object] = None
    """pipeline.KeptRun of the last segment request that asked to keep its session (for correct requests)."""

    def handle(self, request: dict) -> bool:
        """Run one request; False when the worker should exit."""
        kind = request.get("type")
        if kind == "exit":
            return False
        if kind == "segment":
            self.segment(request)
        elif kind == "correct":
            self.correct(request)
        elif kind == "download":
            self.download(request)
        else:
            self.emit({"event": "error", "id": request.get("id"), "kind": "InputError",
                       "message": f"Unknown request type {kind!r}.", "details": ""})
        return True

    def segment(self, request: dict) -> None:
        request_id = request.get("id")
        started = time.perf_counter()
        try:
            settings = settings_from_request(request["settings"])
            image = image_from_request(request)
            self.emit({"event": "loading", "id": request_id, "reused": self.models.key is not None})
            segmenter, scorer = self.models.get(settings)
            loaded = time.perf_counter()

            def progress(done: int, total: int) -> None:
                self.emit({"event": "progress", "id": request_id, "done": int(done), "total": int(total)})

            self.kept = None  # a new run: the old one's embeddings go before new ones are made
            keep = self._keep if request.get("keep_session") else None
            mask, report = self._run(image, settings, segmenter, scorer, progress, keep)
            paths = write_outputs(Path(request["output"]), mask, report)
            self.emit({"event": "done", "id": request_id, **paths, "summary": report.get("summary", {}),
                       "model_loads": self.models.loads, "load_seconds": round(loaded - started, 3),
                       "seconds": round(time.perf_counter() - started, 3)})
        except BaseException as error:  # reported to the effect, which shows it; the worker lives on
            self.emit(error_event(request_id, error))
            if is_out_of_memory(error):
                self.models.clear()
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise

    def _keep(self, kept) -> None:
        self.kept = kept

    def correct(self, request: dict) -> None:
        """Correct the kept run with the request's hints; only the slices they change are recomputed."""
        from .pipeline import correct_kept

        request_id = request.get("id")
        started = time.perf_counter()
        try:
            if self.kept is None:
                raise InputError("There is no kept preview to correct: run Preview first (the engine keeps one "
                                 "preview's slices at a time).")

            def progress(done: int, total: int) -> None:
                self.emit({"event": "progress", "id": request_id, "done": int(done), "total": int(total)})

            stop = Path(request["output"]) / STOP_FILE  # the effect's Cancel during an Update
            mask, report = correct_kept(self.kept, request.get("hints") or [], progress=progress,
                                        should_cancel=stop.exists,
                                        say=lambda text: self.emit({"event": "notice", "text": str(text)}))
            paths = write_outputs(Path(request["output"]), mask, report)
            self.emit({"event": "done", "id": request_id, **paths, "summary": report.get("summary", {}),
                       "correction": report["correction"], "model_loads": self.models.loads,
                       "seconds": round(time.perf_counter() - started, 3)})
        except BaseException as error:  # reported to the effect; the kept run stays for another try
            self.emit(error_event(request_id, error))
            if is_out_of_memory(error):
                self.kept = None
                self.models.clear()
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise

    def download(self, request: dict) -> None:
        """Fetch each file into the cache (SHA256-checked, renamed into place only when whole)."""
        from .models import weights

        request_id = request.get("id")
        try:
            files, paths = list(request["files"]), []
            for index, item in enumerate(files):
                spec = weights.WeightsFile(str(item["filename"]), item.get("url"), item.get("sha256"),
                                           item.get("size_bytes"))
                report = ByteReporter(self.emit, request_id, index, len(files), str(item.get("name", "")),
                                      spec.filename)
                report(0, spec.size_bytes)
                path = weights.resolve(spec, None, request.get("model_dir") or None, download=True,
                                       progress=False, on_bytes=report)
                size = path.stat().st_size
                report(size, size, final=True)
                paths.append(str(path))
            self.emit({"event": "done", "id": request_id, "paths": paths})
        except BaseException as error:  # reported to the panel; a partial file was already removed
            self.emit(error_event(request_id, error))
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise

    def _run(self, image, settings, segmenter, scorer, progress, keep=None):
        from .pipeline import segment_image

        mask, report = segment_image(image, settings, segmenter, scorer, progress=progress,
                                     say=lambda text: self.emit({"event": "notice", "text": str(text)}), keep=keep)
        if report.get("summary", {}).get("notices"):
            self.models.clear()  # they may have moved to the CPU: the next request loads them afresh
            self.kept = None
        return mask, report


@dataclass
class ByteReporter:
    """Progress events of one file of a download, at most every `interval` seconds (a fast link
    delivers thousands of chunks; the panel reads a few times a second)."""

    emit: Callable[[dict], None]
    request_id: object
    index: int
    count: int
    name: str
    filename: str
    interval: float = 0.1
    _last: float = -1e9

    def __call__(self, received: int, total: Optional[int], final: bool = False) -> None:
        now = time.monotonic()
        if not final and received and now - self._last < self.interval:
            return
        if received:  # the first bytes are always shown: a link that stalls after them shows them
            self._last = now
        self.emit({"event": "progress", "id": self.request_id, "file": self.index, "files": self.count,
                   "name": self.name, "filename": self.filename, "done": int(received),
                   "total": int(total or 0)})


def write_outputs(folder: Path, mask: np.ndarray, report: dict) -> Dict[str, str]:
    """The mask (uint8, the volume's shape) and the report, each written whole before it is named."""
    folder.mkdir(parents=True, exist_ok=True)
    mask_path, report_path = folder / MASK_FILE, folder / REPORT_FILE
    partial = folder / (MASK_FILE + ".partial.npy")
    np.save(partial, np.ascontiguousarray(mask, dtype=np.uint8), allow_pickle=False)
    os.replace(partial, mask_path)
    partial = folder / (REPORT_FILE + ".partial")
    partial.write_text(json.dumps(report, default=str), encoding="utf-8")
    os.replace(partial, report_path)
    return {"mask": str(mask_path), "report": str(report_path)}


def is_out_of_memory(error: BaseException) -> bool:
    try:
        from .models.device import is_out_of_memory as check
    except ImportError:
        return isinstance(error, MemoryError)
    return check(error)


def error_event(request_id, error: BaseException) -> dict:
    """What the effect needs to explain a failure: a kind it can act on, a message, the traceback."""
    if is_out_of_memory(error):
        kind = "OutOfMemory"
    elif isinstance(error, (MissingWeightsError, Cancelled, InputError)):
        kind = type(error).__name__
    elif isinstance(error, SalipError):
        kind = "SalipError"
    else:
        kind = "Exception"
    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return {"event": "error", "id": request_id, "kind": kind, "message": str(error) or type(error).__name__,
            "details": details}


# -- the process ------------------------------------------------------------------------------


def protocol_stream() -> TextIO:
    """A private stdout for protocol lines; fd 1 and sys.stdout then point at stderr.

    Libraries print (and C code writes to fd 1); none of that may end up between JSON lines.
    """
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return protocol


def serve(requests: TextIO, protocol: TextIO) -> int:
    def emit(event: dict) -> None:
        protocol.write(json.dumps(event) + "\n")
        protocol.flush()

    worker = Worker(emit)
    emit({"event": "ready", "pid": os.getpid(), "protocol": PROTOCOL_VERSION, "python": sys.version.split()[0]})
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError as error:
            emit(error_event(None, InputError(f"Not a JSON request: {error}")))
            continue
        if not worker.handle(request):
            break
    return 0


def main() -> int:
    protocol = protocol_stream()
    return serve(sys.stdin, protocol)


if __name__ == "__main__":
    sys.exit(main())
