"""Whose turn it is on the server's one engine, and what the running render is doing.

The browser UI and the HTTP API share one `Jobs` (the `ui.Studio` owns it): every render, a UI click
or an API request, takes its `turn`, first come first served, so a request that comes during
another waits and is never dropped. While it renders it reports its steps (`step`), so either front
shows the other's progress (`snapshot`: the webui's `/sdapi/v1/progress` fields). `interrupt` stops
the running render between two steps, `skip` only its current batch (the API renders the next one).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class Jobs:
    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0  # tickets handed out, in arrival order
        self._serving = 0  # the ticket whose turn it is
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._state = self._idle()
        self.current_image = None  # the last image the running job finished (a PIL image), or None

    @staticmethod
    def _idle() -> dict:
        return dict(job="", job_count=0, job_no=0, job_timestamp="0", sampling_step=0, sampling_steps=0,
                    started=0.0, textinfo=None)

    @property
    def waiting(self) -> int:
        """Renders waiting for their turn (not counting the running one)."""
        with self._cond:
            return max(0, self._next_ticket - self._serving - 1)

    @contextmanager
    def turn(self, job: str, job_count: int = 1):
        """Wait for this render's turn (first come, first served), then hold the engine until the block
        ends. `job` names it (`txt2img`, `img2img`, ...); `job_count` is how many batches it renders."""
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._cond.wait()
        try:
            self._interrupt.clear()
            self._skip.clear()
            self.current_image = None
            now = time.time()
            self._state = dict(self._idle(), job=job, job_count=job_count, started=now,
                               job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(now)))
            yield self
        finally:
            self._state = self._idle()
            self._interrupt.clear()
            self._skip.clear()
            with self._cond:
                self._serving += 1
                self._cond.notify_all()

    def batch(self, job_no: int) -> None:
        """The running job starts its batch `job_no` (0-based)."""
        self._state.update(job_no=job_no, sampling_step=0)

    def step(self, done: int, total: int) -> None:
        """The running job finished sampling step `done` of `total` (of its current batch or run)."""
        self._state.update(sampling_step=done, sampling_steps=total)

    def interrupt(self) -> None:
        """Stop the running render (if any) at its next step."""
        if self._state["job"]:
            self._interrupt.set()

    def skip(self) -> None:
        """Stop the running render's current batch at its next step; the API goes on with the next."""
        if self._state["job"]:
            self._skip.set()

    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def skipped(self) -> bool:
        return self._skip.is_set()

    def clear_skip(self) -> None:
        self._skip.clear()

    def cancelled(self) -> bool:
        """Whether the running render should stop now (interrupted, or its batch skipped)."""
        return self._interrupt.is_set() or self._skip.is_set()

    def snapshot(self) -> tuple[float, float, dict]:
        """(progress in [0, 1], seconds left by the rate so far, the webui's `state` dict) of the running
        job; (0, 0, idle state) when none runs."""
        s = dict(self._state)
        state = dict(skipped=self._skip.is_set(), interrupted=self._interrupt.is_set(), stopping_generation=False,
                     job=s["job"], job_count=s["job_count"], job_timestamp=s["job_timestamp"], job_no=s["job_no"],
                     sampling_step=s["sampling_step"], sampling_steps=s["sampling_steps"])
        if not s["job_count"]:
            return 0.0, 0.0, state
        # as the webui's progressapi: 0.01 so the rate is defined, + finished batches + this batch's steps
        progress = 0.01 + s["job_no"] / s["job_count"]
        if s["sampling_steps"]:
            progress += s["sampling_step"] / s["sampling_steps"] / s["job_count"]
        elapsed = time.time() - s["started"]
        return min(progress, 1.0), max(0.0, elapsed / progress - elapsed), state
