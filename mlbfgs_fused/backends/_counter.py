"""What the host knows of an arena's step counter, for the plans that run a pass only
where a pair can be due (docs/design.md, "The foreach backend" and "Distributed")."""

from __future__ import annotations

import torch
from torch import Tensor


class CounterProbe:
    """What the host knows of an arena's step counter without waiting for the device.

    After each step the counter is copied to host memory (pinned and non-blocking
    on CUDA, with an event marking completion). At the next step, if that copy has
    landed, the host has a lower bound ``t0`` on the counter and the number of steps
    run since; the counter can only have grown by the finite ones among them. So a
    pair update is possible at this step only if a multiple of ``update_period``
    lies in the range the counter can reach, and the (masked) pair update is run
    only then: every ``update_period`` steps instead of every step. Nothing ever
    waits: a copy still in flight counts as "unknown" and the pair update runs.
    On the CPU every copy has landed by the time it returns.

    ``wait=True`` (a distributed rank whose pair update issues collectives): every
    rank must answer alike, so the answer may not depend on when a copy lands. The
    probe then waits for the previous step's copy (on the CPU it has always landed;
    on CUDA the event of work enqueued a whole step earlier) and is exact.
    """

    def __init__(self, device: torch.device, wait: bool = False):
        cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.int64, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.wait = wait
        self.calls = 0  # steps run on this arena
        self.calls_at_copy: int | None = None  # None: no copy issued yet

    def _landed(self) -> bool:
        if self.calls_at_copy is None:
            return False
        if self.event is None:
            return True
        if self.wait:
            self.event.synchronize()
            return True
        return self.event.query()

    def pair_update_possible(self, update_period: int) -> bool:
        """Called once per step, before the pair update."""
        self.calls += 1
        if not self._landed():
            return True
        t0 = int(self.host.tolist())  # host memory whose copy is complete: no device read
        since = self.calls - 1 - self.calls_at_copy
        highest = t0 + since + 1  # the counter after this step, if every step was finite
        return highest // update_period > t0 // update_period

    def record(self, counter: Tensor) -> None:
        """Called once per step, after the counter was updated."""
        if self.calls_at_copy is not None and not self._landed():
            return  # the previous copy is still in flight: keep it, never wait
        self.host.copy_(counter, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.calls_at_copy = self.calls
