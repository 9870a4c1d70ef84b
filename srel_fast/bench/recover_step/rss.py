"""Peak RSS growth of a CPU run, sampled from /proc/self/statm."""
from __future__ import annotations

import os
import threading


class RSSSampler:
    """Peak resident-set-size growth over the start value, sampled every 2 ms
    from /proc/self/statm (CPU runs; no tracemalloc). Allocator caching makes
    it an indication only: memory freed by an earlier provider is reused."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2 ** 20


class NoSampler:
    """Stands in for RSSSampler where no sampling is done (CUDA runs)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
