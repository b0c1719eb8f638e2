"""Share the CPU between the model's threads and the decode worker processes.

On CPU, torch's intra-op threads and the decode workers run on the same cores. While the run waits
for decoded images, extra model threads only take time from the decoders (and OpenMP threads that
spin between batches take more); while the model is the bottleneck it should have every thread.
So after every few batches the balancer compares the time spent waiting for decoders with the
time spent in the model and moves the thread count one step, between 1 and the count torch had
when the run began, which it restores at the end (a server's searches share that setting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class ThreadBalancer:
    get_threads: Callable[[], int]
    set_threads: Callable[[int], None]
    batches_per_step: int = 4  # judge over a few batches: single batches are noisy
    model_bound_below: float = 0.25  # waiting < this x model time: the model is the bottleneck

    def __post_init__(self) -> None:
        self.most = self.get_threads()
        self.current = self.most
        self._batches = 0
        self._waited = 0.0
        self._computed = 0.0

    @classmethod
    def for_device(cls, device: str | None) -> "ThreadBalancer | None":
        """A balancer of torch's threads when the model runs on the CPU; None on an accelerator."""
        if device is None or not str(device).startswith("cpu"):
            return None
        import torch

        return cls(torch.get_num_threads, torch.set_num_threads)

    def observe(self, batches: int, waited_s: float, model_s: float) -> None:
        """Account `batches` batches that waited `waited_s` for decoders and ran `model_s` in the model."""
        self._batches += batches
        self._waited += waited_s
        self._computed += model_s
        if self._batches < self.batches_per_step:
            return
        if self._waited > self._computed:
            self._set(self.current - 1)  # decoders are behind: give them the core
        elif self._waited < self.model_bound_below * self._computed:
            self._set(self.current + 1)
        self._batches, self._waited, self._computed = 0, 0.0, 0.0

    def _set(self, threads: int) -> None:
        threads = min(max(threads, 1), self.most)
        if threads != self.current:
            self.set_threads(threads)
            self.current = threads

    def restore(self) -> None:
        self._set(self.most)
