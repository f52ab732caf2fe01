"""A wall-clock budget for training (`--time-budget MIN`): the number of steps that fits, measured, then
measured again.

Before the run, `TimeBudget.calibrate` times a few real steps and one evaluation on the trainer, and puts every
state it touched back (weights, optimizer, loader, RNG), so the run itself is not changed by the measurement.
From those times it fits max_steps (and the warm-up, in proportion) to the budget. The first steps are
slower (allocations, caches), so at step REFIT_STEP the trainer asks `refit` again, from the step times it
measured by then; on a `wsd` schedule it asks again every REFIT_EVERY steps while the learning rate is at its
peak (moving the decay's start changes none of the steps taken), from the pace of the last REFIT_EVERY steps and
the evaluations' measured times: a machine that was slow while the run was calibrated gives the time back, and
one that slows down later does not overrun. With `budget_extends` off (the `gpu` preset, whose max_steps is sized
to its data), the configured max_steps is an upper bound: the budget only shortens the run.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from gpt2scratch.runtime import all_reduce

log = logging.getLogger(__name__)

REFIT_STEP = 100  # max_steps is fitted again from the step times measured up to this step
REFIT_EVERY = 100  # then (wsd, at the peak learning rate) every this many steps, from the last this many steps
WARMUP_CALLS = 2  # untimed steps before calibrating: allocations, kernel selection, compilation
CALIBRATION_STEPS = 5


@dataclass
class TimeBudget:
    deadline: float  # time.perf_counter() value
    eval_seconds: float  # what one evaluation costs
    eval_every: int
    max_steps: int  # fitted by calibrate, then by refit
    warmup_steps: int
    device: torch.device
    limit: int | None = None  # max_steps is never fitted above this (budget_extends off: the configured max_steps)
    step_seconds: list[float] = field(default_factory=list)  # every step of the run so far
    eval_seconds_measured: list[float] = field(default_factory=list)  # every evaluation of the run so far

    @classmethod
    def calibrate(cls, trainer, minutes: float) -> TimeBudget:
        """Fit max_steps to `minutes` from the trainer's own step and evaluation times (rehearsed, not kept)."""
        started = time.perf_counter()
        with trainer.rehearsal():
            for _ in range(WARMUP_CALLS):
                trainer.train_step()
            step_seconds = statistics.median(trainer.train_step()["dt_ms"] / 1000 for _ in range(CALIBRATION_STEPS))
            eval_started = time.perf_counter()
            trainer.evaluate()
            eval_seconds = time.perf_counter() - eval_started
        schedule = trainer.schedule
        budget = cls(
            deadline=started + minutes * 60,
            eval_seconds=eval_seconds,
            eval_every=trainer.config.training.eval_every,
            max_steps=schedule.max_steps,
            warmup_steps=schedule.warmup_steps,
            device=trainer.runtime.device,
            limit=None if trainer.config.training.budget_extends else schedule.max_steps,
        )
        steps = budget._same_on_every_rank(budget._bounded(budget._steps_left(step_seconds)))
        budget.max_steps = steps
        budget.warmup_steps = min(schedule.warmup_steps, round(steps * schedule.warmup_steps / schedule.max_steps))
        log.info(
            f"time budget {minutes:g} min: {step_seconds * 1000:.0f} ms/step, {eval_seconds:.1f} s/eval -> "
            f"max_steps {budget.max_steps}, warmup_steps {budget.warmup_steps}"
        )
        return budget

    def record(self, step_seconds: float) -> None:
        self.step_seconds.append(step_seconds)

    def record_eval(self, seconds: float) -> None:
        self.eval_seconds_measured.append(seconds)
        self.eval_seconds = statistics.median(self.eval_seconds_measured[-3:])

    def refit_due(self, step: int, at_peak_lr: bool = False) -> bool:
        """At REFIT_STEP; after it, every REFIT_EVERY steps while the learning rate is still at its peak (`wsd`
        before its decay: the trainer says), where a new max_steps moves only steps to come."""
        return step == REFIT_STEP or (step > REFIT_STEP and step % REFIT_EVERY == 0 and at_peak_lr)

    def median_step_seconds(self) -> float:
        """The median time of the last REFIT_EVERY steps (of all so far at REFIT_STEP), without the run's first few
        (slower) steps."""
        return statistics.median(self.step_seconds[5:][-REFIT_EVERY:] or self.step_seconds)

    def refit(self, step: int, at_least: int = 0) -> int:
        """max_steps fitted again to the time left, from the recent step times (and never under `at_least`: the
        trainer's smallest max_steps whose decay starts after this step)."""
        steps = max(step + self._steps_left(self.median_step_seconds()), self.warmup_steps, step + 1, at_least)
        self.max_steps = self._same_on_every_rank(self._bounded(steps))
        return self.max_steps

    def _bounded(self, steps: int) -> int:
        return steps if self.limit is None else min(steps, self.limit)

    def _steps_left(self, step_seconds: float) -> int:
        seconds = self.deadline - time.perf_counter()
        steps = seconds / step_seconds
        n_evals = 1 + (int(steps) // self.eval_every if self.eval_every else 0)
        return max(1, int((seconds - n_evals * self.eval_seconds) / step_seconds))

    def _same_on_every_rank(self, steps: int) -> int:
        """The smallest rank's answer: every rank must stop at the same step."""
        return int(all_reduce(torch.tensor([steps], device=self.device), "min").item())
