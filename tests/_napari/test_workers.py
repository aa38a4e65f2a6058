"""_workers.py: the work of a worker runs in a thread that ends with it."""

from __future__ import annotations

import threading

import pytest

from napari_sam._napari._workers import in_short_lived_thread


def test_work_runs_in_its_own_thread_which_ends_with_it():
    ran_in = []

    def work():
        ran_in.append(threading.current_thread())
        return 42

    assert in_short_lived_thread(work)() == 42
    (thread,) = ran_in
    assert thread is not threading.current_thread()
    assert not thread.is_alive()  # gone, with whatever torch started in it
    in_short_lived_thread(work)()
    assert ran_in[1] is not thread  # a new one per job


def test_an_exception_reaches_the_caller_unchanged():
    class Boom(Exception):
        pass

    error = Boom("no weights")

    def work():
        raise error

    with pytest.raises(Boom) as info:
        in_short_lived_thread(work)()
    assert info.value is error
