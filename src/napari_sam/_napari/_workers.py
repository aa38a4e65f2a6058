"""Background work with napari's ``thread_worker`` (imported here: it pulls in Qt).

The compute functions know nothing about threads; this module runs them in
a worker thread with a napari progress bar, and hands results back on the
main thread. A download's ``progress(done, total)`` calls, made in the
worker thread, are relayed to the main thread through a Qt signal before
they touch any napari progress bar.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from typing import Any

#: Workers still running: kept alive until ``finished`` (their Qt signals
#: must outlive the result handlers, which drop the caller's reference).
_RUNNING: set = set()
_EXIT_HOOK: list = []


def wait_for_workers(msecs: int = 30_000) -> bool:
    """Block until every worker thread has returned (True) or ``msecs`` passed (False).

    Registered at exit: a worker thread still running while Python shuts
    down would touch Qt objects already deleted and abort the process.
    """
    if not _RUNNING:
        return True
    from qtpy.QtCore import QThreadPool

    return bool(QThreadPool.globalInstance().waitForDone(msecs))


def can_run_async() -> bool:
    """True when a Qt application exists (so worker results can come back)."""
    try:
        from qtpy.QtWidgets import QApplication
    except ImportError:  # pragma: no cover - Qt is a dependency
        return False
    return QApplication.instance() is not None


def in_short_lived_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` wrapped to run in a fresh Python thread that ends with it.

    Qt's pool keeps its worker threads alive for 30 s after a job, and while
    a thread that ran parallel torch work is alive, torch in the main thread
    runs slower: a ViT-B click took 40-42 ms instead of 24-27 after an
    embedding computed in a pool thread (2-core Xeon, torch 2.14; the same
    with ``OMP_WAIT_POLICY=PASSIVE``), for as long as the pool thread lived. A
    thread that exits with its job takes its OpenMP team with it, and the
    clicks after it run at full speed. The result, or the exception, is
    handed back to the calling (pool) thread.
    """

    def run() -> Any:
        outcome: list = []

        def target() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as exc:  # handed to the pool thread, raised there
                outcome.append((False, exc))

        thread = threading.Thread(target=target, name="napari-sam job", daemon=True)
        thread.start()
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return run


def start_worker(
    fn: Callable[[], Any],
    *,
    desc: str,
    on_returned: Callable[[Any], None],
    on_errored: Callable[[BaseException], None],
):
    """Run ``fn()`` in a thread with an indeterminate napari progress bar.

    The work itself runs in a thread of its own that ends with it
    (:func:`in_short_lived_thread`).

    Parameters
    ----------
    fn : callable
        Work without arguments; its return value goes to ``on_returned``.
    desc : str
        Progress bar text.
    on_returned, on_errored : callable
        Called on the main thread with the result or the exception.

    Returns
    -------
    napari.qt.threading.FunctionWorker
        Already started.
    """
    from napari.qt.threading import thread_worker

    worker = thread_worker(
        in_short_lived_thread(fn),
        progress={"total": 0, "desc": desc},
        connect={"returned": on_returned, "errored": on_errored},  # errors are handled
        start_thread=False,
    )()
    if not _RUNNING and not _EXIT_HOOK:
        atexit.register(wait_for_workers)
        _EXIT_HOOK.append(True)
    _RUNNING.add(worker)
    worker.finished.connect(lambda: _RUNNING.discard(worker))
    worker.start()
    return worker


class DownloadProgress:
    """A ``progress(done, total)`` callable safe to call from any thread.

    Each call is queued to the main thread, where a napari progress bar (in
    megabytes) is created on the first call and updated on the next ones;
    ``on_update(done, total)`` is called there too (e.g. for a label).

    Parameters
    ----------
    desc : str
        Progress bar text.
    on_update : callable, optional
        Main-thread callback with the raw ``(done_bytes, total_bytes)``.
    """

    def __init__(self, desc: str, on_update: Callable[[int, int | None], None] | None = None):
        from qtpy.QtCore import QObject, Signal

        class _Relay(QObject):
            changed = Signal(object, object)

        self._relay = _Relay()
        self._relay.changed.connect(self._on_main_thread)
        self._desc = desc
        self._on_update = on_update
        self._bar = None
        self._shown = 0
        self._done = -1
        self._closed = False

    def __call__(self, done: int, total: int | None) -> None:
        self._relay.changed.emit(int(done), None if total is None else int(total))

    def _on_main_thread(self, done: int, total: int | None) -> None:
        from napari.utils import progress

        if done < self._done or self._closed:  # late or after the end (nested event loops)
            return
        self._done = done
        if self._on_update is not None:
            self._on_update(done, total)
        mb = done // 2**20
        if self._bar is None:
            self._bar = progress(total=(total // 2**20) if total else 0, desc=self._desc)
        if mb > self._shown:
            self._bar.update(mb - self._shown)
            self._shown = mb
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        """Remove the progress bar (idempotent); later calls are ignored."""
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
