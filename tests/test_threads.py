"""The thread balancer: fewer model threads while decoders are behind, all of them while the model is."""

from __future__ import annotations

from indexer.threads import ThreadBalancer


def balancer(start: int = 4) -> tuple[ThreadBalancer, list[int]]:
    calls: list[int] = []
    return ThreadBalancer(lambda: start, calls.append, batches_per_step=2), calls


def test_decoders_behind_takes_threads_one_step_per_window_down_to_one():
    threads, calls = balancer(3)
    for _ in range(10):
        threads.observe(1, waited_s=0.5, model_s=0.1)
    assert calls == [2, 1] and threads.current == 1


def test_model_bound_gets_threads_back_but_never_more_than_at_start():
    threads, calls = balancer(3)
    for _ in range(4):
        threads.observe(1, waited_s=0.5, model_s=0.1)
    for _ in range(10):
        threads.observe(1, waited_s=0.0, model_s=0.4)
    assert calls == [2, 1, 2, 3] and threads.current == 3


def test_balanced_run_stays_put_and_judges_whole_windows():
    threads, calls = balancer(2)
    threads.observe(1, waited_s=5.0, model_s=0.1)  # half a window: no verdict yet
    assert calls == []
    threads.observe(1, waited_s=0.0, model_s=5.0)  # the window as a whole is balanced
    for _ in range(6):
        threads.observe(1, waited_s=0.2, model_s=0.4)  # waits between a quarter and all of the model time
    assert calls == []


def test_restore_and_accelerators():
    threads, calls = balancer(2)
    threads.observe(2, waited_s=1.0, model_s=0.1)
    threads.restore()
    assert calls == [1, 2]
    assert ThreadBalancer.for_device("cuda:0") is None and ThreadBalancer.for_device("cpu") is not None
