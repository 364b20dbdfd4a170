"""Learning-rate schedules: linear warm-up followed by poly or cosine decay, per iteration.

A small class instead of ``LambdaLR`` so that the state (iteration, total) is plain data in the checkpoint
and the total can change (``--max-minutes`` stretches the schedule to the time budget).
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from nnsynth.exceptions import PlansError

POLY_EXPONENT = 0.9          # nnU-Net's poly exponent
WARMUP_MAX_FRACTION = 0.1    # warm-up never takes more than this share of all iterations (short runs)


def lr_factor(iteration: int, total: int, warmup: int, schedule: str, exponent: float = POLY_EXPONENT,
              final_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``iteration`` (0-based) of ``total``; decays to ``final_fraction``."""
    if warmup > 0 and iteration < warmup:
        return (iteration + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (iteration - warmup) / span))
    if schedule == "poly":
        return final_fraction + (1 - final_fraction) * (1.0 - progress) ** exponent
    if schedule == "cosine":
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "constant":
        return 1.0
    raise PlansError(f"Unknown learning-rate schedule {schedule!r} in the plans (use poly, cosine or constant)")


class WarmupSchedule:
    """Sets the learning rate of every parameter group before each optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, total_iters: int, warmup_iters: int,
                 schedule: str, exponent: float = POLY_EXPONENT, min_lr: float = 0.0) -> None:
        lr_factor(0, max(total_iters, 1), warmup_iters, schedule)  # validate the name early
        self.optimizer, self.base_lr = optimizer, float(base_lr)
        self.exponent, self.final_fraction = float(exponent), (float(min_lr) / float(base_lr) if base_lr else 0.0)
        self.total_iters, self.warmup_iters, self.schedule = int(total_iters), int(warmup_iters), schedule
        self.iteration = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def current_lr(self) -> float:
        return self.base_lr * lr_factor(self.iteration, self.total_iters, self.warmup_iters, self.schedule,
                                        self.exponent, self.final_fraction)

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def set_total(self, total_iters: int) -> None:
        """Shrink or grow the schedule; warm-up keeps at most the same share of it as at the start."""
        self.total_iters = int(total_iters)
        self.warmup_iters = min(self.warmup_iters, max(1, int(WARMUP_MAX_FRACTION * self.total_iters)))
        self._apply()

    def state_dict(self) -> Dict[str, object]:
        return {"iteration": self.iteration, "total_iters": self.total_iters, "warmup_iters": self.warmup_iters,
                "schedule": self.schedule, "base_lr": self.base_lr, "exponent": self.exponent,
                "final_fraction": self.final_fraction}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.iteration = int(state["iteration"])
        self.total_iters = int(state["total_iters"])
        self.warmup_iters = int(state["warmup_iters"])
        self.schedule = str(state["schedule"])
        self.base_lr = float(state["base_lr"])
        self.exponent, self.final_fraction = float(state["exponent"]), float(state["final_fraction"])
        self._apply()
