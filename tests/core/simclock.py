"""Simulated time shared by the simulators (:mod:`tests.core.sim`, :mod:`tests.core.farm_sim`).

``run``/``run_until`` move :attr:`now` forward in steps of :data:`STEP` seconds and call the
simulator's ``_advance`` after each step (deliver what is due, tick the machines, check the
invariants). Every line of the transcript starts with the simulated time.
"""

from __future__ import annotations

from collections.abc import Callable

STEP = 0.01  # simulated seconds per step


class SimClock:
    now: float = 0.0
    transcript: list[str]

    def _advance(self) -> None:
        raise NotImplementedError

    def log(self, line: str) -> None:
        self.transcript.append(f"{self.now:7.2f} {line}")

    def _next_step(self) -> None:
        self.now = round(self.now + STEP, 6)
        self._advance()

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self._next_step()

    def run_until(self, cond: Callable[[], bool], limit: float = 30.0) -> float:
        """Advance until ``cond()``; return the simulated time it took. Fails after ``limit``."""
        start = self.now
        while not cond():
            if self.now - start > limit:
                raise AssertionError(
                    f"condition not reached in {limit} s:\n" + "\n".join(self.transcript[-30:])
                )
            self._next_step()
        return self.now - start
