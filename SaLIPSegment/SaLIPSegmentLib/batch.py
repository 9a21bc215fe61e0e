"""`salip batch`: a whole dataset, resumable, in worker processes or on a Ray cluster.

The driver (the `salip batch` process) does all the file work: it finds the cases,
checksums and reads each input, hands the voxels to a worker, writes the worker's mask
and report atomically and records the case in the manifest. Workers only compute,
each with its models loaded once. So Ray actors on other machines need no shared file
system, and a run stopped at any point leaves every file whole or absent; the next run
skips what the manifest records as done with the same input and settings.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from . import __version__
from .errors import Cancelled, InputError, ModelError, OutputError, SalipError
from .io import Image3D, read_image, write_json, write_labelmap, write_segmentation
from .pipeline import SegmentSettings, load_models, segment_image

MANIFEST_NAME = "salip-batch-manifest.json"
MANIFEST_VERSION = 1
FORMATS = {"seg.nrrd": ".seg.nrrd", "nifti": ".nii.gz"}


# -- what was done: the manifest --------------------------------------------------------------


def input_checksum(path: Path) -> str:
    """SHA256 of a volume file, or of a DICOM folder's file names and contents."""
    from .models.weights import file_sha256

    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for member in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{member.relative_to(path)}\0{file_sha256(member)}\n".encode())
    return digest.hexdigest()


def job_fingerprint(settings: SegmentSettings, output_format: str) -> str:
    return hashlib.sha256(f"{settings.fingerprint()} {output_format}".encode()).hexdigest()


class Manifest:
    """OUTPUT_DIR/salip-batch-manifest.json: one entry per case, rewritten atomically after each."""

    def __init__(self, folder: Path):
        self.path = folder / MANIFEST_NAME
        self.data = {"manifest_version": MANIFEST_VERSION, "cases": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
                if not isinstance(self.data.get("cases"), dict):
                    raise ValueError("no cases table")
            except (OSError, ValueError) as error:
                raise InputError(f"The batch manifest {self.path} cannot be read ({error}); move it away to "
                                 "start afresh (finished outputs will then be redone).") from error

    @property
    def cases(self) -> Dict[str, dict]:
        return self.data["cases"]

    def is_done(self, case: str, checksum: str, fingerprint: str, folder: Path) -> bool:
        entry = self.cases.get(case, {})
        return (entry.get("status") == "done" and entry.get("input_sha256") == checksum
                and entry.get("job_sha256") == fingerprint
                and all((folder / name).is_file() for name in entry.get("outputs", {})))

    def owns(self, case: str, path: Path) -> bool:
        """Whether path is a file this batch wrote for the case and nobody has changed since."""
        from .models.weights import file_sha256

        known = self.cases.get(case, {}).get("written_sha256", {}).get(path.name, [])
        return bool(known) and file_sha256(path) in known

    def record(self, case: str, entry: dict) -> None:
        self.cases[case] = entry
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


# -- the compute side: one worker holds the models -----------------------------------------------


@dataclass
class CaseOutcome:
    case: str
    ok: bool
    packed_mask: Optional[np.ndarray] = None
    shape: tuple = ()
    report: dict = field(default_factory=dict)
    error: str = ""
    fatal: bool = False
    """The worker cannot run anything (its models failed to load): stop the batch."""
    seconds: float = 0.0
    worker: str = ""

    def mask(self) -> np.ndarray:
        count = int(np.prod(self.shape))
        return np.unpackbits(self.packed_mask, count=count).reshape(self.shape).astype(bool)


class CaseWorker:
    """Loads the plugins and models once, then segments whatever volumes it is handed."""

    def __init__(self, settings: SegmentSettings, plugins: str = "", threads: Optional[int] = None,
                 device: Optional[str] = None):
        import torch

        from .models import resolve_device
        from .models.registry import load_plugins

        self.settings, self.load_error = settings, ""
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        if threads:
            torch.set_num_threads(threads)
        try:
            load_plugins(plugins)
            self.device = resolve_device(device or settings.device)
            started = time.perf_counter()
            self.segmenter, self.scorer = load_models(settings.sam, settings.clip, self.device,
                                                      settings.sam_checkpoint, settings.model_dir, progress=False,
                                                      precision=settings.precision)
            self.load_seconds = time.perf_counter() - started
        except SalipError as error:
            self.load_error = str(error)

    def ready(self) -> str:
        """'' when the models are loaded, else why not."""
        return self.load_error

    def run(self, case: str, image: Image3D, progress: Optional[Callable[[int, int], None]] = None) -> CaseOutcome:
        if self.load_error:
            return CaseOutcome(case, ok=False, error=self.load_error, fatal=True, worker=self.name)
        started = time.perf_counter()
        try:
            mask, report = segment_image(image, self.settings, self.segmenter, self.scorer, progress=progress)
        except SalipError as error:
            return CaseOutcome(case, ok=False, error=str(error), seconds=time.perf_counter() - started,
                               worker=self.name)
        except Exception as error:  # a bug on one case must not end the batch; keep its traceback
            return CaseOutcome(case, ok=False, error=f"internal error: {type(error).__name__}: {error}\n"
                               + traceback.format_exc(), seconds=time.perf_counter() - started, worker=self.name)
        report.update(device=str(self.device), worker=self.name, model_load_seconds=round(self.load_seconds, 3))
        return CaseOutcome(case, ok=True, packed_mask=np.packbits(mask.ravel()), shape=mask.shape, report=report,
                           seconds=time.perf_counter() - started, worker=self.name)


# -- engines: where the workers run ---------------------------------------------------------------


class InlineEngine:
    """One worker in this process (the default on a machine without GPUs)."""

    def __init__(self, settings, plugins, device=None):
        self.worker = CaseWorker(settings, plugins, device=device)
        if self.worker.load_error:
            raise ModelError(self.worker.load_error)
        self.capacity, self.description = 1, "1 worker in this process"
        self.done: List = []
        self.on_slice: Optional[Callable[[str, int, int], None]] = None
        """Told (case, done, total) as slices finish: in this process, a long case can show its slices."""

    def submit(self, case, image):
        handle = object()
        progress = (lambda done, total: self.on_slice(case, done, total)) if self.on_slice else None
        self.done.append((handle, self.worker.run(case, image, progress)))
        return handle

    def next_done(self, handles):
        return self.done.pop(0)

    def close(self):
        pass


_process_worker: Optional[CaseWorker] = None


def _start_process_worker(settings, plugins, threads, devices, counter):
    global _process_worker
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _process_worker = CaseWorker(settings, plugins, threads, devices[index % len(devices)] if devices else None)


def _run_in_process_worker(case, image):
    return _process_worker.run(case, image)


class ProcessEngine:
    """N worker processes on this machine, each with its own models (one per GPU where there are GPUs)."""

    def __init__(self, settings, plugins, workers: int, devices: List[str]):
        context = multiprocessing.get_context("spawn")  # fork and torch threads do not mix
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.args = (settings, plugins, threads, devices)
        self.workers, self.context = workers, context
        self.capacity = workers
        where = f"on {', '.join(devices)}" if devices else f"{threads} CPU thread(s) each"
        self.description = f"{workers} worker processes ({where})"
        self._start()

    def _start(self):
        counter = self.context.Value("i", 0)
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=self.context, initializer=_start_process_worker,
            initargs=(*self.args, counter))

    def submit(self, case, image):
        try:
            future = self.pool.submit(_run_in_process_worker, case, image)
        except concurrent.futures.process.BrokenProcessPool:
            # A worker died since the last result: this case goes to a new pool; those in flight fail.
            self._restart()
            future = self.pool.submit(_run_in_process_worker, case, image)
        future.case, future.pool = case, self.pool
        return future

    def _restart(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._start()

    def next_done(self, handles):
        done, _ = concurrent.futures.wait(list(handles), return_when=concurrent.futures.FIRST_COMPLETED)
        future = next(iter(done))
        try:
            return future, future.result()
        except concurrent.futures.process.BrokenProcessPool:
            # A worker died (killed, out of memory): every case in that pool fails; the next ones get a new pool.
            if future.pool is self.pool:
                self._restart()
            return future, CaseOutcome(future.case, ok=False, error="the worker process died (out of memory?)")

    def close(self):
        for process in list(getattr(self.pool, "_processes", {}).values()):
            process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayEngine:
    """One actor per GPU of a Ray cluster (or --workers actors on CPUs), each holding the models."""

    def __init__(self, settings, plugins, workers: Optional[int], address: Optional[str]):
        # No telemetry: Ray would otherwise report usage statistics from a cluster this process starts.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address is None and not os.environ.get("RAY_ADDRESS"):
            # A private local instance: keep Ray on the loopback interface (read when ray is imported).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError:
            raise InputError("--engine ray needs Ray: pip install 'ray==2.60.0' on this machine and every "
                             "node of the cluster.") from None
        self.ray = ray
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False,
                     include_dashboard=False if address is None else None)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise InputError(f"Cannot reach the Ray cluster at {address or 'a new local instance'}: "
                             f"{str(error).splitlines()[0]}") from None
        resources = ray.cluster_resources()
        gpus = 0 if settings.device == "cpu" else int(resources.get("GPU", 0))
        count = workers or gpus or 1
        if gpus and count > gpus:  # an actor waiting for a GPU that never frees would hang the batch
            ray.shutdown()
            raise InputError(f"--workers {count} asks for more actors than the cluster's {gpus} GPU(s); "
                             "give at most that many, or --device cpu.")
        threads = max(1, int(resources.get("CPU", 1)) // count)
        self.actor_class = ray.remote(num_cpus=threads, num_gpus=1 if gpus else 0)(CaseWorker)
        device = "cuda" if gpus else "cpu"  # Ray shows each actor just its own GPU
        self.make_actor = lambda: self.actor_class.remote(settings, plugins, threads, device)
        self.actors = [self.make_actor() for _ in range(count)]
        errors = [e for e in ray.get([actor.ready.remote() for actor in self.actors]) if e]
        if errors:
            self.close()
            raise ModelError(errors[0])
        self.idle = list(self.actors)
        self.capacity = count
        self.description = (f"{count} Ray actors on {address or 'a local Ray instance'} "
                            f"({'1 GPU' if gpus else f'{threads} CPUs'} each)")
        self.busy: Dict = {}

    def submit(self, case, image):
        actor = self.idle.pop()
        reference = actor.run.remote(case, image)
        self.busy[reference] = (actor, case)
        return reference

    def next_done(self, handles):
        (reference,), _ = self.ray.wait(list(handles), num_returns=1)
        actor, case = self.busy.pop(reference)
        try:
            outcome = self.ray.get(reference)
        except self.ray.exceptions.RayActorError as error:
            actor = self.make_actor()  # the actor died; its replacement loads the models again
            self.actors.append(actor)
            outcome = CaseOutcome(case, ok=False, error=f"the Ray actor died: {str(error).splitlines()[0]}")
        except self.ray.exceptions.RayError as error:  # the task itself failed in Ray (not in SaLIP)
            outcome = CaseOutcome(case, ok=False, error=f"Ray: {str(error).splitlines()[0]}")
        self.idle.append(actor)
        return reference, outcome

    def close(self):
        for actor in self.actors:
            self.ray.kill(actor)
        self.ray.shutdown()


# -- the driver ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Let a Ctrl-C arriving while a case is committed wait until the outputs and manifest agree."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


@dataclass
class BatchSummary:
    done: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    cancelled: bool = False
    seconds: float = 0.0
    left: int = 0

    def table(self) -> str:
        lines = [f"{'cases':>6} {'done':>6} {'skipped':>8} {'failed':>7} {'time':>10}",
                 f"{len(self.done) + len(self.skipped) + len(self.failed) + self.left:>6} {len(self.done):>6} "
                 f"{len(self.skipped):>8} {len(self.failed):>7} {self.seconds:>9.1f}s"]
        if self.failed:
            lines.append("failed:")
            lines += [f"  {case}: {error.splitlines()[0]}" for case, error in self.failed.items()]
        if self.cancelled:
            lines.append(f"cancelled with {self.left} case(s) left: run the same command again to go on.")
        return "\n".join(lines)


def output_names(case: str, output_format: str) -> List[str]:
    return [case + FORMATS[output_format], case + ".report.json"]


def run_batch(
    cases: List[tuple],
    output_dir: Path,
    settings: SegmentSettings,
    *,
    output_format: str = "seg.nrrd",
    engine: str = "local",
    workers: Optional[int] = None,
    address: Optional[str] = None,
    overwrite: bool = False,
    say: Callable[[str], None] = lambda text: None,
    show_progress: bool = False,
) -> BatchSummary:
    """Segment every (case, path) into output_dir; skip what the manifest says is done."""
    from .models.catalog import ORACLES
    from .models.registry import PLUGINS_ENV

    if settings.clip in ORACLES:
        raise InputError(f"--clip {settings.clip} needs a reference mask per case; batch has none "
                         "(use evaluate-dataset).")
    _check_output_folder(output_dir)
    manifest = Manifest(output_dir)
    fingerprint = job_fingerprint(settings, output_format)
    summary, started = BatchSummary(), time.perf_counter()
    todo = _cases_to_do(cases, manifest, fingerprint, output_dir, summary)
    redone = [c for c, _, _ in todo if manifest.cases.get(c, {}).get("status") == "done"]
    say(f"{len(cases)} cases: {len(summary.skipped)} already done, {len(todo)} to do"
        + (f" ({len(redone)} redone: input or settings changed)" if redone else ""))
    manifest.data.update(salip_version=__version__, settings=settings.describe(), format=output_format)
    if todo:
        runner = _make_engine(engine, settings, os.environ.get(PLUGINS_ENV, ""), workers, address)
        say(f"Running on {runner.description}.")
        dispatch = _Dispatch(runner, manifest, summary, settings, fingerprint, output_dir, output_format, overwrite)
        dispatch.show(say, total=len(cases) if show_progress else None)
        dispatch.run(todo)
    summary.seconds = time.perf_counter() - started
    return summary


def _check_output_folder(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"Cannot create the output folder {output_dir}: {error}") from error
    if not os.access(output_dir, os.W_OK):
        raise OutputError(f"Output folder {output_dir} is not writable.")


def _cases_to_do(cases, manifest: Manifest, fingerprint: str, output_dir: Path, summary: BatchSummary) -> list:
    """(case, path, checksum) of the cases not done yet; checksums first, so that what is done is
    known before any model loads. Unreadable inputs go into the summary as failed."""
    todo = []
    for case, path in cases:
        try:
            checksum = input_checksum(path) if path.exists() else None
        except OSError as error:
            checksum, summary.failed[case] = None, f"cannot read {path}: {error}"
            continue
        if checksum and manifest.is_done(case, checksum, fingerprint, output_dir):
            summary.skipped.append(case)
        else:
            todo.append((case, path, checksum))
    return todo


class _Dispatch:
    """Hands cases to an engine's workers as they have room, and commits each result as it comes back."""

    def __init__(self, runner, manifest: Manifest, summary: BatchSummary, settings: SegmentSettings,
                 fingerprint: str, output_dir: Path, output_format: str, overwrite: bool):
        self.runner, self.manifest, self.summary, self.settings = runner, manifest, summary, settings
        self.fingerprint, self.output_dir, self.output_format, self.overwrite = (
            fingerprint, output_dir, output_format, overwrite)
        self.bar, self.log, self.finished = None, print, 0

    def show(self, say: Callable[[str], None], total: Optional[int]) -> None:
        """A progress bar over `total` cases (None: none), and where messages go."""
        if total is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=len(self.summary.skipped) + len(self.summary.failed), unit="case",
                            desc="batch", file=sys.stderr)
            if isinstance(self.runner, InlineEngine):
                self.runner.on_slice = self._show_slice
        self.log = self.bar.write if self.bar is not None else say

    def _show_slice(self, case: str, done: int, total: int) -> None:
        self.bar.set_postfix_str(f"{case}: slice {done}/{total}")

    def run(self, todo: list) -> None:
        queue, in_flight = list(todo), {}
        try:
            while queue or in_flight:
                self._submit(queue, in_flight)
                if not in_flight:
                    break
                self._collect(in_flight)
        except KeyboardInterrupt:
            self.summary.cancelled, self.summary.left = True, len(todo) - self.finished
        finally:
            if self.bar is not None:
                self.bar.close()
            self.runner.close()

    def _submit(self, queue: list, in_flight: dict) -> None:
        """Read and hand over cases while the workers have room; a case that cannot start fails here."""
        while queue and len(in_flight) < self.runner.capacity:
            case, path, checksum = queue.pop(0)
            image, error = _prepare(case, path, checksum, self.output_dir, self.output_format, self.manifest,
                                    self.overwrite)
            if error:
                self._fail(case, path, checksum, error)
                continue
            handle = self.runner.submit(case, image)
            # The worker has the voxels; keep only the geometry (a zero-stride view costs no memory).
            geometry = dataclasses.replace(image, array=np.broadcast_to(np.uint8(0), image.array.shape))
            in_flight[handle] = (case, path, checksum, geometry)
            del image

    def _collect(self, in_flight: dict) -> None:
        """Wait for the next case to finish and write it (or record why it failed)."""
        handle, outcome = self.runner.next_done(in_flight)
        case, path, checksum, geometry = in_flight.pop(handle)
        if outcome.fatal:
            raise ModelError(outcome.error)
        if not outcome.ok:
            self._fail(case, path, checksum, outcome.error)
            return
        with _ctrl_c_deferred():
            voxels = _commit(self.manifest, outcome, path, geometry, checksum, self.fingerprint, self.output_dir,
                             self.output_format, self.settings.prompt)
        self.finished += 1
        self.summary.done.append(case)
        self.log(f"{case}: done in {outcome.seconds:.1f} s ({voxels} voxels)")
        if self.bar is not None:
            self.bar.update()

    def _fail(self, case, path, checksum, error) -> None:
        self.finished += 1
        _fail(self.manifest, self.summary, case, path, checksum, self.fingerprint, error, self.log)
        if self.bar is not None:
            self.bar.update()


def _make_engine(engine, settings, plugins, workers, address):
    if engine == "ray":
        return RayEngine(settings, plugins, workers, address)
    if engine != "local":
        raise InputError(f"--engine takes local or ray, got {engine!r}.")
    from .models.device import local_gpus

    devices = local_gpus(settings.device)
    count = workers or max(1, len(devices))
    if count == 1:
        return InlineEngine(settings, plugins, devices[0] if devices else None)
    return ProcessEngine(settings, plugins, count, devices)


def _prepare(case, path, checksum, output_dir, output_format, manifest, overwrite):
    """(image, '') ready to segment, or (None, why not)."""
    if checksum is None:
        return None, f"input {path} does not exist"
    for name in output_names(case, output_format):
        target = output_dir / name
        if target.exists() and not overwrite and not manifest.owns(case, target):
            return None, (f"{target} exists and this batch did not write it (or it was edited since): "
                          "left untouched; move it away or pass --overwrite")
    try:
        return read_image(path), ""
    except SalipError as error:
        return None, str(error)


def _commit(manifest, outcome, path, geometry, checksum, fingerprint, output_dir, output_format, prompt) -> int:
    """Write the case's files atomically, then record them, with their SHA256, in the manifest."""
    from .models.weights import file_sha256

    mask = outcome.mask()
    segmentation_name, report_name = output_names(outcome.case, output_format)
    if output_format == "nifti":
        write_labelmap(output_dir / segmentation_name, mask, geometry)
    else:
        write_segmentation(output_dir / segmentation_name, mask, geometry, prompt.display_name, prompt.color)
    write_json(output_dir / report_name, {"case": outcome.case, "input": str(path),
                                         "output": str(output_dir / segmentation_name), **outcome.report})
    written = {name: file_sha256(output_dir / name) for name in (segmentation_name, report_name)}
    previous = manifest.cases.get(outcome.case, {}).get("written_sha256", {})
    manifest.record(outcome.case, {
        "status": "done", "input": str(path), "input_sha256": checksum, "job_sha256": fingerprint,
        "outputs": written,
        # Every version this batch wrote: a later run may replace these, never a file someone edited.
        "written_sha256": {name: sorted(set(previous.get(name, [])) | {sha}) for name, sha in written.items()},
        "seconds": round(outcome.seconds, 3), "worker": outcome.worker,
        "voxels": int(mask.sum()), "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    return int(mask.sum())


def _fail(manifest, summary, case, path, checksum, fingerprint, error, log):
    summary.failed[case] = error
    previous = manifest.cases.get(case, {})
    manifest.record(case, {
        "status": "failed", "input": str(path), "input_sha256": checksum, "job_sha256": fingerprint,
        "error": error, "written_sha256": previous.get("written_sha256", {}),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    log(f"{case}: FAILED: {error.splitlines()[0]}")


def cancelled_error(summary: BatchSummary) -> Cancelled:
    return Cancelled(f"Cancelled: {len(summary.done)} done this run, {summary.left} left; the manifest keeps "
                     "every finished case, so the same command goes on where this one stopped.")
