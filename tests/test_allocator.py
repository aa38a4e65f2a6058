"""glibc allocator tuning: no-op when disabled or unavailable, counted nesting, restore."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from napari_sam import allocator


class _FakeLibc:
    """Records ``mallopt``/``malloc_trim`` calls instead of making them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    """A recording libc, no lingering tuned state from earlier tests, and no linger."""
    allocator.release_now()
    libc = _FakeLibc()
    monkeypatch.delenv("NAPARI_SAM_MALLOC_TUNING", raising=False)
    monkeypatch.setattr(allocator, "_libc", lambda: libc)
    monkeypatch.setattr(allocator, "_LINGER_S", 0.0)
    yield libc
    allocator.release_now()


_TUNED_CALLS = [
    ("mallopt", allocator._M_MMAP_MAX, 0),
    ("mallopt", allocator._M_TRIM_THRESHOLD, 1 << 30),
    ("mallopt", allocator._M_TOP_PAD, 64 << 20),
]
_NORMAL_CALLS = [
    ("mallopt", allocator._M_MMAP_MAX, 65536),
    ("mallopt", allocator._M_TRIM_THRESHOLD, 64 << 20),
    ("mallopt", allocator._M_TOP_PAD, 128 << 10),
    ("mallopt", allocator._M_MMAP_THRESHOLD, 32 << 20),
]


def test_disabled_by_environment_is_a_no_op(fake_libc, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_MALLOC_TUNING", "0")
    assert not allocator.allocator_tuning_available()
    with allocator.tuned_allocator() as active:
        assert active is False
        torch.zeros(1 << 20).sum()
    assert fake_libc.calls == []


def test_without_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    with allocator.tuned_allocator() as active:
        assert active is False


def test_settings_apply_once_for_nested_blocks_and_are_restored(fake_libc):
    with allocator.tuned_allocator() as active:
        assert active is True
        tuned = list(fake_libc.calls)
        with allocator.tuned_allocator():
            assert fake_libc.calls == tuned  # inner block changes nothing
        assert fake_libc.calls == tuned
    assert tuned == _TUNED_CALLS
    assert fake_libc.calls[len(tuned) :] == [*_NORMAL_CALLS, ("malloc_trim", 0)]


def test_release_false_keeps_the_pages(fake_libc):
    with allocator.tuned_allocator(release=False):
        pass
    assert ("malloc_trim", 0) not in fake_libc.calls
    assert fake_libc.calls[-1] == ("mallopt", allocator._M_MMAP_THRESHOLD, 32 << 20)


def test_restored_after_an_exception(fake_libc):
    with pytest.raises(RuntimeError, match="boom"), allocator.tuned_allocator():
        raise RuntimeError("boom")
    assert fake_libc.calls[-1] == ("malloc_trim", 0)
    assert allocator._depth == 0


def test_concurrent_blocks_restore_once(fake_libc):
    inside = threading.Barrier(2)

    def work():
        with allocator.tuned_allocator():
            inside.wait(timeout=5)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert [c for c in fake_libc.calls if c[0] == "malloc_trim"] == [("malloc_trim", 0)]
    assert sum(c == ("mallopt", allocator._M_MMAP_MAX, 0) for c in fake_libc.calls) == 1


def test_real_glibc_round_trip():
    if allocator._libc() is None:
        pytest.skip("not glibc")
    with allocator.tuned_allocator() as active:
        assert active is allocator.allocator_tuning_available()
        x = torch.ones(8 << 20)  # 32 MiB: would be an mmap without the tuning
        assert float(x.sum()) == 8 << 20


def test_a_release_request_survives_an_overlapping_short_block(fake_libc):
    outer = allocator.tuned_allocator(release=True)
    inner = allocator.tuned_allocator(release=False)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the encode ends first ...
    assert ("malloc_trim", 0) not in fake_libc.calls
    inner.__exit__(None, None, None)  # ... the decode that outlived it trims for it
    assert fake_libc.calls[-1] == ("malloc_trim", 0)
    with allocator.tuned_allocator(release=False):
        pass
    assert fake_libc.calls.count(("malloc_trim", 0)) == 1  # the request was consumed


def test_the_tuned_state_lingers_for_the_next_call_then_ends(fake_libc, monkeypatch):
    """A block that starts within the linger keeps the state and its pages; then one trim."""
    monkeypatch.setattr(allocator, "_LINGER_S", 0.3)
    with allocator.tuned_allocator():
        pass
    assert fake_libc.calls == _TUNED_CALLS  # still tuned, nothing trimmed yet
    with allocator.tuned_allocator(release=False):  # the next slice, within the linger
        pass
    assert fake_libc.calls == _TUNED_CALLS  # not re-applied, not restored
    deadline = time.monotonic() + 5
    while len(fake_libc.calls) == len(_TUNED_CALLS) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    # the first block's release request survived the second one
    assert fake_libc.calls == _TUNED_CALLS + _NORMAL_CALLS + [("malloc_trim", 0)]
    assert allocator._timer is None and allocator._depth == 0


def test_release_now_ends_a_lingering_state_at_once(fake_libc, monkeypatch):
    monkeypatch.setattr(allocator, "_LINGER_S", 60.0)
    with allocator.tuned_allocator():
        inside = list(fake_libc.calls)
        allocator.release_now()  # inside a block: nothing
        assert fake_libc.calls == inside
    assert fake_libc.calls == _TUNED_CALLS
    allocator.release_now()
    assert fake_libc.calls == _TUNED_CALLS + _NORMAL_CALLS + [("malloc_trim", 0)]
    allocator.release_now()  # nothing lingers any more
    assert len(fake_libc.calls) == len(_TUNED_CALLS + _NORMAL_CALLS) + 1
    with allocator.tuned_allocator(release=False):
        pass
    allocator.release_now()
    assert fake_libc.calls[-1] == _NORMAL_CALLS[-1]  # a decode's linger ends without a trim
