"""Over-relaxation of the Sinkhorn steps: how large a step to take, from the errors seen so far.

A relaxed step moves each potential ``omega`` times as far as a plain Sinkhorn step,
``f <- (1 - omega) f + omega (log a - LSE_j(S/eps + g))`` and the same for ``g`` (scalings:
``u <- u^(1-omega) (a / K v)^omega``); ``omega = 1`` is plain Sinkhorn, and the fixed point is the
same for every ``omega`` in (0, 2). Near the fixed point Sinkhorn is block Gauss-Seidel on a linear
system whose plain rate is ``lam`` (the second eigenvalue, Lehmann et al.'s Theta^2), and by Young's
SOR theory the relaxed rate ``rho`` and ``lam`` are tied by ``(rho + omega - 1)^2 = rho omega^2 lam``;
the best step is ``omega* = 2 / (1 + sqrt(1 - lam))``, with rate ``omega* - 1`` (Lehmann, von Renesse,
Sambale, Uschmajew, "A note on overrelaxation in the Sinkhorn algorithm", Optim. Lett. 2022;
ott-jax's ``Momentum`` with ``start > 0``, which estimates ``lam`` once from two errors).

:class:`AdaptiveRelaxation` starts plain (far from the fixed point over-relaxation need not converge),
estimates ``lam`` from the error's decay over a window, and keeps re-estimating it through Young's
relation while relaxed (only where the observed rate lies on the relation's branch, ``omega - 1 < rho
< 1``, and at most halving ``1 - lam`` at a time): Sinkhorn's local rate worsens as it nears the fixed
point, and one early estimate (ott's) under-relaxes. If the error grows the schedule falls back to
plain steps for good (plain Sinkhorn converges from anywhere).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

OMEGA_MAX = 1.95  # the rate is omega - 1 at best: 1.95 still converges, slowly, when lam is overestimated
LAM_MAX = 0.9999
STALL = 50  # iterations without a new best error after which a fixed relaxation falls back


def omega_from_rate(lam: float) -> float:
    """Lehmann et al.'s optimal relaxation for a plain contraction rate ``lam`` in [0, 1)."""
    lam = min(max(lam, 0.0), LAM_MAX)
    return min(2.0 / (1.0 + math.sqrt(1.0 - lam)), OMEGA_MAX)


def plain_rate(rho: float, omega: float) -> float:
    """The plain rate ``lam`` that Young's relation gives for a rate ``rho`` seen at step ``omega``."""
    if omega == 1.0:
        return rho
    return (rho + omega - 1.0) ** 2 / (rho * omega * omega)


@dataclass
class AdaptiveRelaxation:
    """The relaxation schedule: ``omega = schedule.update(iteration, error)`` after each error check.

    ``start``: plain iterations before the first estimate; ``window``: iterations between estimates;
    ``growth``: fall back to plain steps when the error exceeds ``growth`` x the best seen while relaxed
    (relaxed errors oscillate by a few times near the optimal step; a divergence grows geometrically),
    or when no new best came for ``10 window`` iterations (a stall: float32 rounding amplified by the
    relaxed steps near the precision floor, where plain steps still get lower).
    """

    start: int = 10
    window: int = 5
    growth: float = 10.0
    omega: float = 1.0
    fell_back: bool = False
    lam: float = 0.0
    _ref: tuple[int, float] | None = None  # (iteration, error) at the start of the current window
    _best: float = math.inf
    _best_it: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)  # (iteration, omega) changes
    needs_errors = True  # (class attribute) the solver must measure the error at every check

    def __post_init__(self):
        if self.lam > 0.0:  # a warm start's rate: relaxed from the second iteration on
            self.omega, self.start = omega_from_rate(self.lam), 0

    def update(self, it: int, err: float) -> float:
        if self.fell_back or not math.isfinite(err) or err <= 0.0:
            return self.omega
        if self.omega > 1.0:
            if err > self.growth * self._best or it - self._best_it >= 10 * self.window:
                return self._fall_back(it)  # diverging, or stalled (a float32 noise floor): plain steps
            if err < self._best:
                self._best, self._best_it = err, it
        if self._ref is None or it < self.start - self.window:
            self._ref = (it, err)
            return self.omega
        it0, err0 = self._ref
        span = self.window if self.omega == 1.0 else 2 * self.window  # relaxed errors oscillate
        if it - it0 < span or it < self.start:
            return self.omega
        rho = (err / err0) ** (1.0 / (it - it0))
        self._ref = (it, err)
        if not self.omega - 1.0 < rho < 1.0:  # outside the linear theory (an oscillation, a transient)
            return self.omega
        # at most halve 1 - lam per estimate: a bump of the error must not throw omega to its cap
        lam = min(plain_rate(rho, self.omega), 1.0 - (1.0 - self.lam) / 2.0) if self.lam else plain_rate(rho, 1.0)
        if lam > self.lam:
            self.lam = lam
            if self.omega == 1.0:
                self._best, self._best_it = err, it
            self.omega = omega_from_rate(lam)
            self.history.append((it, self.omega))
        return self.omega

    def _fall_back(self, it: int) -> float:
        self.fell_back, self.omega = True, 1.0
        self.history.append((it, 1.0))
        return 1.0


@dataclass
class FixedRelaxation:
    """A constant ``omega`` (ott's ``Momentum(value=omega)``), with the same fall-back on growth."""

    omega: float
    growth: float = 10.0
    fell_back: bool = False
    _best: float = math.inf
    _best_it: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def needs_errors(self) -> bool:
        return self.omega != 1.0 and not self.fell_back

    def update(self, it: int, err: float) -> float:
        if self.omega != 1.0 and not self.fell_back and math.isfinite(err):
            if err > self.growth * self._best or (self._best_it and it - self._best_it >= STALL):
                self.fell_back, self.omega = True, 1.0
                self.history.append((it, 1.0))
            if err < self._best:
                self._best, self._best_it = err, it
        return self.omega


def schedule(relax: float | str, fixed_iterations: bool, lam: float = 0.0):
    """The schedule for ``sinkhorn(relax=...)``: 'auto' is adaptive when iterating to a tolerance
    and plain for a fixed iteration count (POT's and SwAV's iterates); 'adaptive'; or a number in (0, 2).
    ``lam``: a rate known from an earlier solve (adaptive schedules start from it)."""
    if isinstance(relax, str):
        if relax == "auto":
            return FixedRelaxation(1.0) if fixed_iterations else AdaptiveRelaxation(lam=lam)
        if relax == "adaptive":
            return AdaptiveRelaxation(lam=lam)
        raise ValueError(f"relax must be 'auto', 'adaptive' or a number in (0, 2), not {relax!r}")
    omega = float(relax)
    if not 0.0 < omega < 2.0:
        raise ValueError(f"relax must be in (0, 2) (1 = plain Sinkhorn), got {relax}")
    return FixedRelaxation(omega)
