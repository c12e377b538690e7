"""The loss-spike guard (OLMo-core's skip-step rule): an optimizer step whose loss or gradient norm spikes is not
applied, on every rank, and training goes on with the next batch.

A step is a spike when its loss or gradient norm is not finite, or, with `sigmas` set, when either is above the
mean plus `sigmas` sample standard deviations of that value over the last `window` accepted steps. Only accepted
steps feed the statistics: a skipped spike left in them would widen the band it was judged by, so a burst of bad
batches would let its later ones through; kept out, the band describes the training the run is keeping. The price
is that a lasting rise (a run resumed on other data) is skipped step after step until optim.max_skipped_steps
stops the run: a loud stop, where the other rule would adapt quietly. The guard judges nothing until it has a full
window. It decides from the reduced values, the same on every rank, so every rank decides the same; its state (the
window and the count) goes into every checkpoint."""

from __future__ import annotations

import math
from collections import deque

JUDGED = ("loss", "grad_norm")


class SpikeGuard:
    def __init__(self, sigmas: float | None, window: int) -> None:
        self.sigmas = sigmas  # None: only non-finite steps are skipped
        self.recent = {name: deque(maxlen=window) for name in JUDGED}  # of accepted steps, oldest first
        self.skipped = 0

    def check(self, loss: float, grad_norm: float, *also_finite: float) -> str | None:
        """None when the step's update is to be applied (its values join the window), else why it is skipped
        (counted). `also_finite`: further values (auxiliary losses) that need only be finite."""
        values = {"loss": loss, "grad_norm": grad_norm}
        reason = self._spike(values, also_finite)
        if reason is None:
            for name, value in values.items():
                self.recent[name].append(value)
        else:
            self.skipped += 1
        return reason

    def _spike(self, values: dict[str, float], also_finite: tuple[float, ...]) -> str | None:
        if not all(math.isfinite(v) for v in (*values.values(), *also_finite)):
            shown = ", ".join(f"{name} {value}" for name, value in values.items())
            return f"not finite: {shown}" + (f", auxiliary losses {list(also_finite)}" if also_finite else "")
        for name, value in values.items():
            limit = self.limit(name)
            if limit is not None and value > limit:
                return (
                    f"{name} {value:.5g} is above {limit:.5g}, the mean + {self.sigmas:g} standard deviations of "
                    f"the last {len(self.recent[name])} accepted steps"
                )
        return None

    def limit(self, name: str) -> float | None:
        """Mean + sigmas x sample standard deviation of the window of `name`; None while the guard is off or the
        window is not full."""
        recent = self.recent[name]
        if self.sigmas is None or len(recent) < recent.maxlen:
            return None
        mean = math.fsum(recent) / len(recent)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in recent) / (len(recent) - 1))
        return mean + self.sigmas * std

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped, "spike_window": {name: list(v) for name, v in self.recent.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Also a checkpoint from before the guard: its `nan_skipped` count carries over, the window starts empty.
        A window saved longer than this run's keeps its most recent values."""
        self.skipped = state.get("skipped_steps", state.get("nan_skipped", 0))
        for name, values in state.get("spike_window", {}).items():
            self.recent[name].clear()
            self.recent[name].extend(values)
