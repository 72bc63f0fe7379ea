"""Win rates of a candidate model's completions against a baseline's, on the same prompts.

An outcome is the candidate's result on one prompt (and sample): 1 a win, 0 a loss, 0.5 a tie, which
counts half. ``outcome_from_scores`` makes one from two reward scores, ``outcome_from_both_orders`` from a
pairwise judge asked in both orders (so its preference for a position cancels). ``win_rate`` is their
mean; ``length_controlled_win_rate`` is the win rate at equal length, after AlpacaEval 2 (Dubois et al.
2024, "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators"), simplified to one
candidate against one baseline: a logistic regression of the outcome on the (squashed) length difference,
read off where that difference is zero.

Everything is float64, in numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two float64 numbers that should be equal (p and 0.5 in ``outcome_from_both_orders``) differ by at most a
# few units in the last place, about 1e-16, after one addition and one subtraction. 1e-12 absorbs that
# rounding, and nothing more: a judge whose two answers differ by more than 1e-12 has a preference,
# however slight, and it is counted.
ROUNDING = 1e-12

# The L2 penalty on the length slope b, as the precision of a Gaussian prior on b: N(0, 10^2). The input
# x = tanh(difference / sd) lies in (-1, 1), so |b| = 10 already moves the odds by a factor e^10 (about
# 22,000) between equal lengths and a long difference: a judge deciding by length alone. The prior rules
# out only the infinite slope, which the unpenalized maximum likelihood takes when length alone separates
# the wins from the losses (and then leaves the intercept, the answer, undetermined). It weighs less than
# 1/25 of one outcome (one outcome adds p(1 - p) x^2 <= 1/4 to the information about b), so where the
# outcomes determine b it moves b by a percent or less from 10 outcomes on, and its pull fades as outcomes
# accumulate: a fixed total, not a weight per outcome.
SLOPE_PENALTY = 0.01
NEWTON_STEPS = 200  # the penalized objective is strictly convex: Newton converges in 5-25 steps here
CONVERGED = 1e-13  # a Newton step this small in both coordinates has reached float64's resolution


def outcome_from_scores(score: float, baseline: float, tol: float = 0.0) -> float:
    """1.0 if ``score`` beats ``baseline`` by more than ``tol``, 0.0 if it trails by more, else 0.5."""
    if tol < 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if not (math.isfinite(score) and math.isfinite(baseline)):
        raise ValueError(f"scores must be finite numbers, got {score} and {baseline}")
    if score > baseline + tol:
        return 1.0
    if score < baseline - tol:
        return 0.0
    return 0.5


def outcome_from_both_orders(p_candidate_first: float, p_baseline_first: float) -> float:
    """The candidate's outcome from a pairwise judge asked both ways round.

    ``p_candidate_first`` is the judge's P(first is better) shown (candidate, baseline), ``p_baseline_first``
    its P(first is better) shown (baseline, candidate). The candidate's preference is their average
    (p_candidate_first + 1 - p_baseline_first) / 2, so a judge that always prefers the first position gives
    exactly 0.5: its bias adds the same to both answers and cancels.
    """
    for name, p in (("p_candidate_first", p_candidate_first), ("p_baseline_first", p_baseline_first)):
        if not 0.0 <= p <= 1.0:  # also refuses NaN
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    preference = (p_candidate_first + 1.0 - p_baseline_first) / 2.0
    if preference > 0.5 + ROUNDING:
        return 1.0
    if preference < 0.5 - ROUNDING:
        return 0.0
    return 0.5


def win_rate(outcomes: Sequence[float]) -> float | None:
    """The mean outcome (a tie counts half); None when there are none."""
    labels = _outcomes(outcomes)
    return float(labels.mean()) if labels.size else None


def length_controlled_win_rate(outcomes: Sequence[float], candidate_lengths: Sequence[float],
                               baseline_lengths: Sequence[float]) -> float | None:
    """The win rate at equal length: sigmoid(a) of the fit logit P(win) = a + b x, x = tanh(d / sd(d)),
    d the candidate's length minus the baseline's on each outcome. None when there are no outcomes.

    The fit is maximum likelihood with the outcomes as soft labels (a tie is 0.5) and an L2 penalty on b
    alone (``SLOPE_PENALTY``). When all lengths are equal (sd 0) x is 0 and the fit has only its intercept,
    whose maximum-likelihood value is the mean outcome: the plain win rate, returned as such. When every
    outcome is the same, b = 0 and sigmoid(a) equals that outcome, the limit of the fit (a loss or a win on
    every prompt would need an infinite intercept): returned as such too.

    Where length alone separates wins from losses, the answer comes from the outcomes nearest equal length:
    it is 0.5 when they fall evenly on both sides of d = 0, but with every difference equal to +c or -c,
    say, nothing tells the curve between them and the answer is sigmoid(log(wins / losses) / 2) in the limit.
    """
    labels = _outcomes(outcomes)
    if not len(labels) == len(candidate_lengths) == len(baseline_lengths):
        raise ValueError(f"one length each: {len(labels)} outcomes, {len(candidate_lengths)} candidate lengths, "
                         f"{len(baseline_lengths)} baseline lengths")
    if not labels.size:
        return None
    difference = np.asarray(candidate_lengths, dtype=np.float64) - np.asarray(baseline_lengths, dtype=np.float64)
    if not np.isfinite(difference).all():
        raise ValueError("lengths must be finite numbers")
    spread = float(difference.std())  # over the outcomes given, as the features they are fitted on
    if spread == 0.0 or labels.min() == labels.max():
        return float(labels.mean())
    intercept, _ = fit_length_logistic(labels, np.tanh(difference / spread))
    return float(_sigmoid(np.float64(intercept)))


def fit_length_logistic(labels: np.ndarray, x: np.ndarray, penalty: float = SLOPE_PENALTY) -> tuple[float, float]:
    """(a, b) minimizing sum_i [log(1 + e^z_i) - y_i z_i] + penalty b^2 / 2, z_i = a + b x_i: the negative
    log-likelihood of soft labels y_i in [0, 1], by Newton's method with step halving. Needs labels not all
    0 or all 1 (else a is infinite)."""
    a = math.log(labels.mean() / (1.0 - labels.mean()))  # the intercept-only optimum: b = 0 from there
    b = 0.0
    objective = _objective(labels, x, a, b, penalty)
    for _ in range(NEWTON_STEPS):
        p = _sigmoid(a + b * x)
        residual = p - labels
        weight = p * (1.0 - p)
        gradient = np.array([residual.sum(), (residual * x).sum() + penalty * b])
        hessian = np.array([[weight.sum(), (weight * x).sum()],
                            [(weight * x).sum(), (weight * x * x).sum() + penalty]])
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while True:  # halve a step that would raise the objective (far from the optimum, Newton overshoots)
            trial = _objective(labels, x, a - scale * step[0], b - scale * step[1], penalty)
            if trial <= objective or scale < 1e-10:
                break
            scale /= 2
        a, b, objective = a - scale * step[0], b - scale * step[1], trial
        if np.abs(scale * step).max() < CONVERGED:
            break
    return float(a), float(b)


def _objective(labels: np.ndarray, x: np.ndarray, a: float, b: float, penalty: float) -> float:
    z = a + b * x
    return float(np.sum(np.logaddexp(0.0, z) - labels * z) + penalty * b * b / 2)


def _sigmoid(z):
    """1 / (1 + e^-z) without overflow for large |z|."""
    return np.exp(-np.logaddexp(0.0, -z))


def _outcomes(outcomes: Sequence[float]) -> np.ndarray:
    labels = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    if labels.size and not ((labels >= 0.0) & (labels <= 1.0)).all():  # NaN fails both comparisons
        raise ValueError("outcomes must be numbers in [0, 1] (1 a win, 0.5 a tie, 0 a loss)")
    return labels
