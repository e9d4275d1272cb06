from __future__ import annotations

import sys
import threading
from types import FrameType

import pytest

from services import concurrency
from services.concurrency import (
    LockOrderError,
    SharedCounter,
    Step,
    acquire,
    adjust,
    held_locks,
    snapshot,
)


def run_threads(count: int, target: object, *args: object) -> None:
    threads = [threading.Thread(target=target, args=args) for _ in range(count)]  # type: ignore[arg-type]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()


def test_shared_counter_is_exact_under_contention() -> None:
    counter = SharedCounter()

    def hammer() -> None:
        for _ in range(100_000):
            counter.incr()

    run_threads(8, hammer)
    assert counter.value == 800_000


def test_decr_and_deltas() -> None:
    counter = SharedCounter(10)
    counter.decr()
    counter.incr(5)
    counter.decr(3)
    assert counter.value == 11


def test_opposite_orders_through_acquire_do_not_deadlock() -> None:
    a, b = threading.Lock(), threading.Lock()
    done = []

    def forwards() -> None:
        for _ in range(20_000):
            with acquire(a, b):
                pass
        done.append("forwards")

    def backwards() -> None:
        for _ in range(20_000):
            with acquire(b, a):
                pass
        done.append("backwards")

    threads = [threading.Thread(target=forwards), threading.Thread(target=backwards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(done) == ["backwards", "forwards"]


def test_nested_opposite_orders_fail_fast_in_one_thread() -> None:
    x, y = threading.Lock(), threading.Lock()
    low, high = sorted((x, y), key=id)
    both_inside = threading.Barrier(2, timeout=30)
    errors: dict[str, BaseException] = {}

    def nest(name: str, outer: threading.Lock, inner: threading.Lock) -> None:
        try:
            with acquire(outer):
                both_inside.wait()
                with acquire(inner):
                    pass
        except (LockOrderError, threading.BrokenBarrierError) as error:
            errors[name] = error

    # Each thread holds one lock and then asks for the other: with bare locks this
    # deadlocks forever. Here the thread nesting downwards is refused at once.
    upwards = threading.Thread(target=nest, args=("upwards", low, high))
    downwards = threading.Thread(target=nest, args=("downwards", high, low))
    upwards.start()
    downwards.start()
    upwards.join(60)
    downwards.join(60)
    assert not upwards.is_alive() and not downwards.is_alive()
    assert set(errors) == {"downwards"}
    assert isinstance(errors["downwards"], LockOrderError)
    assert "lock order violation" in str(errors["downwards"])


def test_held_list_is_intact_after_a_lock_order_error() -> None:
    x, y, z = sorted((threading.Lock(), threading.Lock(), threading.Lock()), key=id)
    with acquire(y):
        assert held_locks() == (y,)
        with pytest.raises(LockOrderError), acquire(x, z):
            pass  # pragma: no cover
        assert held_locks() == (y,)
        assert not x.locked() and not z.locked()
        with acquire(z):
            assert held_locks() == (y, z)
        assert held_locks() == (y,)
    assert held_locks() == ()
    assert not any(lock.locked() for lock in (x, y, z))


def test_held_list_is_intact_after_an_exception_inside() -> None:
    x, y = threading.Lock(), threading.Lock()
    with pytest.raises(ZeroDivisionError), acquire(x, y):
        assert set(held_locks()) == {x, y}
        _ = 1 / 0
    assert held_locks() == ()
    assert not x.locked() and not y.locked()


def test_reacquiring_a_held_lock_is_an_error_not_a_deadlock() -> None:
    lock = threading.Lock()
    with acquire(lock), pytest.raises(LockOrderError), acquire(lock):
        pass  # pragma: no cover
    assert not lock.locked()


def test_duplicates_in_one_call_are_taken_once() -> None:
    lock = threading.Lock()
    with acquire(lock, lock):
        assert held_locks() == (lock,)


def test_releases_in_reverse_order() -> None:
    order: list[str] = []

    class Recording:
        def __init__(self, name: str) -> None:
            self.name, self.lock = name, threading.Lock()

        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            order.append(f"+{self.name}")
            return self.lock.acquire(blocking, timeout)

        def release(self) -> None:
            order.append(f"-{self.name}")
            self.lock.release()

    first, second = sorted((Recording("a"), Recording("b")), key=id)
    with acquire(second, first):
        pass
    assert order == [f"+{first.name}", f"+{second.name}", f"-{second.name}", f"-{first.name}"]


def test_adjust_moves_counters_together() -> None:
    arrived, queued, busy, done = (SharedCounter() for _ in range(4))
    finished = threading.Event()
    reads: list[int] = []
    torn: list[tuple[int, ...]] = []

    def mover() -> None:
        for _ in range(20_000):
            adjust((arrived, 1), (queued, 1))
            adjust((queued, -1), (busy, 1))
            adjust((busy, -1), (done, 1))
        finished.set()

    def reader() -> None:
        while not finished.is_set():
            values = snapshot(arrived, queued, busy, done)
            reads.append(1)
            if values[0] != sum(values[1:]):
                torn.append(values)

    threads = [threading.Thread(target=mover), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert reads, "the reader never ran"
    assert torn == []
    assert snapshot(arrived, queued, busy, done) == (20_000, 0, 0, 20_000)


def test_a_step_adds_its_deltas_together_or_not_at_all() -> None:
    queued, busy, started = (SharedCounter() for _ in range(3))
    start = Step(queued, busy, started)
    start(1, 0, 0)
    start(-1, 1, 1)
    assert snapshot(queued, busy, started) == (0, 1, 1)
    with pytest.raises(ValueError):
        start(-1, 1)  # a delta short: nothing is added
    assert snapshot(queued, busy, started) == (0, 1, 1)
    with acquire(busy.lock), pytest.raises(LockOrderError):
        Step(queued, busy)(1, 1)  # checked like acquire(): one of them is held already
    assert held_locks() == ()


@pytest.mark.faults
def test_memory_running_out_at_any_step_of_acquire_leaves_nothing_held() -> None:
    # Under an exhausted address space any allocation fails; the address-space flood hit
    # a `finally` that could not release, and every later thread deadlocked on the lock
    # or was told of a lock-order violation. Fail each builtin call acquire() makes that
    # may allocate (all but a lock's release), one at a time, until one pass gets through.
    outer, inner = threading.Lock(), threading.Lock()
    codes = {
        concurrency.in_lock_order.__code__,
        acquire.__init__.__code__,
        acquire._set_order.__code__,
        acquire.__enter__.__code__,
        acquire.__exit__.__code__,
        concurrency._release.__code__,
    }
    for failing_call in range(1, 200):
        calls = 0

        def fail_one(
            frame: FrameType, event: str, arg: object, failing_call: int = failing_call
        ) -> None:
            nonlocal calls
            releasing = getattr(arg, "__name__", "") == "release"
            if event == "c_call" and frame.f_code in codes and not releasing:
                calls += 1
                if calls == failing_call:
                    raise MemoryError

        sys.setprofile(fail_one)
        try:
            with acquire(outer, inner):
                entered = True
        except MemoryError:
            entered = False
        finally:
            sys.setprofile(None)
        assert not outer.locked() and not inner.locked(), failing_call
        assert held_locks() == (), failing_call
        if entered and calls < failing_call:  # no call left to fail
            break
    else:
        pytest.fail("acquire() made more builtin calls than expected")
    assert failing_call > 3  # the injection reached acquire()'s calls
