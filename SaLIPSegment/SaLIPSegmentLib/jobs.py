"""Run the engine on a worker thread that the GUI polls: progress, cancel, result or error.

The worker never touches Qt or MRML; the GUI reads `progress` from a timer and, once
`finished`, takes `result` (or `error`) on its own thread. No Qt, no Slicer here.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Tuple

from .errors import Cancelled

Work = Callable[[Callable[[int, int], None], Callable[[], bool]], Any]


class BackgroundJob:
    """`work(progress, should_cancel)` on a daemon thread.

    `progress(done, total)` and `should_cancel()` are the callbacks the volume runner
    takes; the job stores the first and answers the second from `cancel()`.
    """

    def __init__(self, work: Work, name: str = "salip-job"):
        self._work = work
        self._name = name
        self._lock = threading.Lock()
        self._progress: Tuple[int, int] = (0, 0)
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def start(self) -> BackgroundJob:
        if self._thread is not None:
            raise RuntimeError("a job runs once")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def _report(self, done: int, total: int) -> None:
        with self._lock:
            self._progress = (done, total)

    def _run(self) -> None:
        try:
            result = self._work(self._report, self._cancel.is_set)
            if self._cancel.is_set():  # asked after the last check: the user still said no
                raise Cancelled("Cancelled; nothing was written.")
            self.result = result
        except BaseException as error:  # handed to the GUI thread, which reports it
            self.error = error
        finally:
            self._done.set()

    def cancel(self) -> None:
        """Ask the work to stop at its next check (between slices)."""
        self._cancel.set()

    @property
    def progress(self) -> Tuple[int, int]:
        with self._lock:
            return self._progress

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, Cancelled)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until finished (for scripts and tests; the GUI polls instead)."""
        return self._done.wait(timeout)
