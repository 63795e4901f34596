"""The learning-rate schedule every method trains with, and the time budget that sets its length.

Owns: linear warm-up then cosine decay to 0 (`lr_at`, as facebookresearch/mae's lr_sched.py),
and `LrSchedule`, that curve over a run's steps. With `--time-budget MIN` the step count is
not known in advance: steps BUDGET_WARM+1..BUDGET_PROBE are timed (past the first steps'
allocations, cudnn autotuning or compilation) to set it so that training ends when the budget
is spent, and it is re-fitted every BUDGET_REFIT of the budget (load on a shared machine
changes). Each re-fit re-anchors the cosine at the current step, so the lr stays continuous
and is exactly 0 on the last step. The clock is the caller's: every method takes `now`, which
keeps this module free of wall time and its tests exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

# --time-budget: steps BUDGET_WARM+1..BUDGET_PROBE are timed to set the run's step count, which
# is then re-fitted every BUDGET_REFIT of the budget.
BUDGET_WARM, BUDGET_PROBE, BUDGET_REFIT = 3, 12, 0.05


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class LrSchedule:
    """Warm-up + cosine over `total` steps; with `budget_min`, `total` is provisional until
    BUDGET_PROBE steps have been timed (the warm-up, which does not depend on it, should cover
    them) and is then fitted to the budget by `observe`."""

    def __init__(self, peak_lr: float, warmup: int, total: int, budget_min: float | None = None):
        self.peak_lr, self.warmup, self.total = peak_lr, warmup, total
        self.budget_min = budget_min
        # The budget's cosine is anchored at the last re-fit: from step `anchor` (progress
        # `anchor_t`) it runs to progress 1 on the last step. `fitted`: a step count was settled
        # (a resumed run keeps it and does not re-time itself: its first session's clock is gone).
        self.anchor, self.anchor_t, self.fitted = warmup, 0.0, False
        self.fitted_on_resume = False
        self._t_probe: float | None = None
        self._probe_from = 0
        self._t_fit: float | None = None
        self._fit_step = 0

    @property
    def budgeted(self) -> bool:
        return self.budget_min is not None

    def lr(self, step: int) -> float:
        """The lr at `step`: lr_at's curve; with a budget, the cosine re-anchored at each re-fit."""
        if not self.budgeted or step < self.warmup:
            return lr_at(step, self.total, self.warmup, self.peak_lr)
        return self.peak_lr * 0.5 * (1 + math.cos(math.pi * self._progress(step)))

    def _progress(self, step: int) -> float:
        """Cosine progress in [0, 1] of a budgeted run at `step` (1 on step total - 1)."""
        a, ta = self.anchor, self.anchor_t
        if step <= a:
            return ta
        return min(1.0, ta + (1 - ta) * (step - a) / max(1, self.total - 1 - a))

    def state_dict(self) -> dict:
        """What a checkpoint stores as its "scheduler" (common/checkpoint.py)."""
        state = {"kind": "warmup_cosine", "peak_lr": self.peak_lr, "warmup": self.warmup}
        state["total"] = self.total
        if self.budgeted:
            state.update(anchor=self.anchor, anchor_t=self.anchor_t, fitted=self.fitted)
        return state

    def load_state_dict(self, state: dict, step: int) -> None:
        """Resume at `step`: a budgeted run that had settled its step count keeps it and its
        anchor. (A run without a budget recomputes its schedule from its flags.)"""
        if self.budgeted and (state.get("fitted") or step >= BUDGET_PROBE):
            self.total = state["total"]
            self.anchor = state.get("anchor", self.warmup)
            self.anchor_t = state.get("anchor_t", 0.0)
            self.fitted = self.fitted_on_resume = True

    def refit_due(self, now: float) -> bool:
        """(Rank 0) BUDGET_REFIT of the budget passed since the last fit."""
        if not self.budgeted or self._t_fit is None or self.fitted_on_resume:
            return False
        return now - self._t_fit >= BUDGET_REFIT * 60 * self.budget_min

    def observe(
        self,
        step: int,
        now: float,
        t0: float,
        refit: bool,
        agree: Callable[[int], int] = lambda total: total,
    ) -> float | None:
        """After `step` steps finished at time `now` (training began at `t0`): start timing at
        BUDGET_WARM, fit `total` at BUDGET_PROBE, and re-fit it when `refit` (refit_due, as
        rank 0 decided it). `agree` makes every rank take the same count (rank 0's: a
        broadcast). Returns the measured seconds per step on the first fit, else None."""
        if self.fitted_on_resume:
            return None
        if self._t_probe is None and BUDGET_WARM <= step < BUDGET_PROBE:
            self._t_probe, self._probe_from = now, step  # (or where a run resumed)
        first = step == BUDGET_PROBE and self._t_probe is not None
        if not (first or (refit and self._t_fit is not None)):
            return None
        t_from, s_from = (
            (self._t_probe, self._probe_from) if first else (self._t_fit, self._fit_step)
        )
        per_step = (now - t_from) / max(1, step - s_from)
        left = 60 * self.budget_min - (now - t0)
        # At least one more step: the step the schedule's lr 0 lands on; but once the budget is
        # spent a re-fit never moves the end further out (else every re-fit adds that step).
        steps_left = int(left / max(per_step, 1e-9))
        total = step + max(1, steps_left)
        if not first and steps_left < 1:
            total = min(total, self.total)
        progress = self._progress(step) if step >= self.warmup else None
        total = agree(total)
        if progress is not None:  # re-anchor: step `step` keeps the lr it would have had
            self.anchor, self.anchor_t = step, progress
        self.total = total
        self._t_fit, self._fit_step, self.fitted = now, step, True
        return per_step if first else None
