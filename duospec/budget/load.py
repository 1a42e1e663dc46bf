"""Whether a measurement ran under visible load (then it serves its run but is never kept on disk)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from duospec.models.base import Model, usable_cores

T = TypeVar("T")
CPU_SHARE_FLOOR = 0.75  # see under_load
LOAD_PER_CORE = 1.5  # see under_load


@dataclass(frozen=True)
class LoadReading:
    """What the machine looked like around one measurement (or one request).

    cpu_seconds: CPU time this process used meanwhile, all its threads (time.process_time).
    wall_seconds: wall time meanwhile.
    threads: threads the measured model computes with, capped at the cores this process may use.
    load_average: the 1-minute load average just before.
    cores: cores that load average is shared by (os.cpu_count(); see under_load).
    cpu_bound: whether the model computes on the CPU (False on an accelerator, where the CPU waits).
    """

    cpu_seconds: float
    wall_seconds: float
    threads: int
    load_average: float
    cores: int
    cpu_bound: bool = True

    @property
    def cpu_share(self) -> float:
        """Share of the CPU time our threads could have had that they got (1.0: never waited)."""
        return self.cpu_seconds / max(self.wall_seconds * self.threads, 1e-9)


def under_load(reading: LoadReading) -> bool:
    """Whether a measurement ran under visible load, so that it must not be kept. Either rule suffices.

    - CPU share (CPU-bound models only): our threads got less than CPU_SHARE_FLOOR (0.75) of the CPU
      time they could have had. A compute-bound pass keeps every thread busy (llama.cpp's and OpenMP's
      workers spin between kernels): on this project's quiet 2-core machine a decode step of a small
      Qwen2 reached a share of 0.89 (2 threads) to 1.0 (1 thread), and 0.3-0.5 with one other busy
      process. This catches contention during the measurement itself, which is what slows it. It means
      nothing on an accelerator, where the CPU mostly waits for the device, so it is skipped there.
    - Load average: more than LOAD_PER_CORE (1.5) runnable threads per core over the last minute means
      work was queueing for the CPU before we started (and it also catches what the share cannot see:
      neighbours on other cores taking memory bandwidth, an accelerator's launch thread starved). It is
      compared with os.cpu_count(), not with our affinity: the kernel's load average counts the whole
      machine (the host, in most containers), so a container pinned to 2 of 64 cores would otherwise
      call every measurement loaded. It lags by up to a minute and counts our own threads (we may have
      just loaded a model with all of them), hence the margin over 1.0.

    A false alarm only costs a measurement that is not kept (it is taken again next run); a missed load
    is caught by the next run's spot check or by the online correction.
    """
    if reading.cpu_bound and reading.cpu_share < CPU_SHARE_FLOOR:
        return True
    return reading.load_average > LOAD_PER_CORE * reading.cores


def model_threads(model: Model) -> int:
    """Threads a model computes with (llama.cpp models say so; transformers uses torch's pool), capped
    at the cores this process may run on: more threads than cores cannot all run at once."""
    threads = getattr(model, "threads", None) or torch.get_num_threads()
    return max(1, min(int(threads), usable_cores()))


@dataclass(frozen=True)
class LoadWatch:
    """The readings a LoadProbe took when a measurement started."""

    cpu_start: float
    wall_start: float
    load_average: float


class LoadProbe:
    """Takes LoadReadings around a measurement.

    The clocks and the load average are injectable so tests can script a quiet or a busy machine;
    `wall_clock` also times the spot checks, for the same reason.
    """

    def __init__(
        self,
        cpu_clock: Callable[[], float] = time.process_time,
        wall_clock: Callable[[], float] = time.perf_counter,
        load_average: Callable[[], float] | None = None,
        cores: int | None = None,
    ) -> None:
        self.cpu_clock = cpu_clock
        self.wall_clock = wall_clock
        self.load_average = load_average or _load_average
        self.cores = cores or os.cpu_count() or 1

    def start(self) -> LoadWatch:
        return LoadWatch(self.cpu_clock(), self.wall_clock(), self.load_average())

    def stop(self, watch: LoadWatch, model: Model) -> LoadReading:
        """The reading since `watch`, for a measurement of `model` (its threads and device)."""
        return LoadReading(
            cpu_seconds=self.cpu_clock() - watch.cpu_start,
            wall_seconds=self.wall_clock() - watch.wall_start,
            threads=model_threads(model),
            load_average=watch.load_average,
            cores=self.cores,
            cpu_bound=torch.device(model.device).type == "cpu",
        )

    def watch(self, measure: Callable[[], T], model: Model) -> tuple[T, LoadReading]:
        """Run `measure` (of `model`) and say what the machine looked like meanwhile."""
        started = self.start()
        value = measure()
        return value, self.stop(started, model)


def _load_average() -> float:
    """The 1-minute load average, or 0.0 where the platform has none (then only the CPU share counts)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0

