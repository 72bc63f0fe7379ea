"""Win rates against a baseline: outcomes from scores or from a judge asked both ways round, the plain win
rate, and the length-controlled one (AlpacaEval 2's regression, one candidate against one baseline), on
cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefopt.judged.winrate import (SLOPE_PENALTY, fit_length_logistic, length_controlled_win_rate,
                                    outcome_from_both_orders, outcome_from_scores, win_rate)


def length_judge(candidate_longer: int, candidate_shorter: int) -> tuple[list[float], list[int], list[int]]:
    """A judge that prefers the longer completion and nothing else, on prompts where the candidate is longer
    by 1, 2, ... tokens on ``candidate_longer`` of them and shorter by 1, 2, ... on the others: (outcomes,
    candidate lengths, baseline lengths)."""
    differences = [*range(1, candidate_longer + 1), *(-k for k in range(1, candidate_shorter + 1))]
    outcomes = [1.0 if d > 0 else 0.0 for d in differences]
    return outcomes, [100 + d for d in differences], [100] * len(differences)


# ----------------------------------------------------------------------------------------------------------
# outcomes


def test_scores_win_lose_or_tie_within_the_tolerance():
    assert outcome_from_scores(0.8, 0.5) == 1.0
    assert outcome_from_scores(0.2, 0.5) == 0.0
    assert outcome_from_scores(0.5, 0.5) == 0.5
    assert outcome_from_scores(0.52, 0.5, tol=0.05) == 0.5  # within the tolerance either way: a tie
    assert outcome_from_scores(0.48, 0.5, tol=0.05) == 0.5
    assert outcome_from_scores(0.56, 0.5, tol=0.05) == 1.0
    assert outcome_from_scores(0.44, 0.5, tol=0.05) == 0.0
    with pytest.raises(ValueError, match="tol must be"):
        outcome_from_scores(0.5, 0.5, tol=-0.1)
    with pytest.raises(ValueError, match="finite"):
        outcome_from_scores(math.nan, 0.5)


def test_both_orders_cancel_a_judge_that_prefers_the_first_position():
    # P(first is better) is the same whichever completion comes first: position alone decides
    for p in (1.0, 0.9, 0.7, 0.5, 0.1, 0.0):
        assert outcome_from_both_orders(p, p) == 0.5
    # a consistent judge: the candidate is better in both orders, or worse in both
    assert outcome_from_both_orders(0.9, 0.1) == 1.0
    assert outcome_from_both_orders(1.0, 0.0) == 1.0
    assert outcome_from_both_orders(0.2, 0.8) == 0.0
    # the orders disagree and the average decides: (0.9 + 1 - 0.7) / 2 = 0.6 for the candidate,
    # (0.6 + 1 - 0.8) / 2 = 0.4 against it
    assert outcome_from_both_orders(0.9, 0.7) == 1.0
    assert outcome_from_both_orders(0.6, 0.8) == 0.0
    # (0.8 + 1 - 0.8) / 2 rounds to 0.5 within a few units in the last place: a tie, not a coin of rounding
    assert outcome_from_both_orders(0.8, 0.8) == 0.5
    with pytest.raises(ValueError, match="p_baseline_first must be a probability"):
        outcome_from_both_orders(0.5, 1.5)
    with pytest.raises(ValueError, match="p_candidate_first"):
        outcome_from_both_orders(math.nan, 0.5)


# ----------------------------------------------------------------------------------------------------------
# win rates


def test_win_rate_counts_ties_half_and_is_none_without_outcomes():
    assert win_rate([1, 0.5, 0, 0.5]) == 0.5
    assert win_rate([1, 1, 0.5, 0]) == 0.625
    assert win_rate([]) is None
    assert length_controlled_win_rate([], [], []) is None
    with pytest.raises(ValueError, match=r"numbers in \[0, 1\]"):
        win_rate([1, 2])
    with pytest.raises(ValueError, match=r"numbers in \[0, 1\]"):
        win_rate([1, None])


def test_mismatched_lengths_are_one_line_errors():
    with pytest.raises(ValueError, match="3 outcomes, 2 candidate lengths, 3 baseline lengths") as error:
        length_controlled_win_rate([1, 0, 1], [5, 6], [5, 5, 5])
    assert "\n" not in str(error.value)


def test_equal_lengths_give_the_plain_win_rate_exactly():
    outcomes = [1, 0, 0.5, 1, 1, 0, 0.5]
    assert length_controlled_win_rate(outcomes, [30] * 7, [30] * 7) == win_rate(outcomes)
    # different lengths, but the same difference everywhere: sd 0, x 0, only the intercept is fitted
    assert length_controlled_win_rate(outcomes, [40] * 7, [30] * 7) == win_rate(outcomes)


def test_all_ties_give_one_half_and_a_judge_always_for_the_candidate_gives_one():
    lengths = [10, 50, 20, 80, 35]
    assert length_controlled_win_rate([0.5] * 5, lengths, [30] * 5) == 0.5
    # a win on every prompt, whatever the lengths: the fit's limit (b = 0, a -> infinity) is exactly 1
    assert length_controlled_win_rate([1.0] * 5, lengths, [30] * 5) == 1.0
    assert length_controlled_win_rate([0.0] * 5, lengths, [30] * 5) == 0.0


@pytest.mark.parametrize("longer,shorter,tolerance", [
    # The penalty holds the slope finite, so the fitted curve is a steep logistic, not a step: it leaves some
    # chance of a loss on the longer side and of a win on the shorter, and the side with more outcomes pulls
    # the intercept towards itself by that residue. The residue shrinks as the slope grows, and the slope
    # grows with the number of outcomes against the fixed penalty. Fitted values: 0.5043 and 0.5332 from 10
    # prompts, 0.500002 and 0.5010 from 100.
    (7, 3, 0.01), (9, 1, 0.04), (70, 30, 0.0001), (90, 10, 0.002),
])
def test_a_judge_that_prefers_length_alone_wins_half_at_equal_length(longer, shorter, tolerance):
    outcomes, candidate, baseline = length_judge(longer, shorter)
    assert win_rate(outcomes) == pytest.approx(longer / (longer + shorter), abs=1e-15)
    controlled = length_controlled_win_rate(outcomes, candidate, baseline)
    assert abs(controlled - 0.5) < tolerance


def test_two_length_differences_leave_the_curve_between_them_open():
    # Every difference +5 or -5 tokens, and the longer completion wins: the fit sees two points, x = +c and
    # x = -c, and the steeper it gets the more its intercept is set by 70 (1 - p+) = 30 p- alone, so that
    # a -> log(70 / 30) / 2 and the answer -> sqrt(7/3) / (1 + sqrt(7/3)) = 0.60436, not 0.5: a limit of
    # the regression (AlpacaEval's too), which the report's reader should know of.
    outcomes = [1.0] * 70 + [0.0] * 30
    controlled = length_controlled_win_rate(outcomes, [105] * 70 + [95] * 30, [100] * 100)
    limit = math.sqrt(7 / 3) / (1 + math.sqrt(7 / 3))
    assert controlled == pytest.approx(limit, abs=0.001)
    assert controlled < win_rate(outcomes) - 0.09  # still well under the plain 0.7


def test_a_candidate_winning_three_in_four_at_every_length_difference_has_that_rate():
    outcomes, candidate, baseline = [], [], []
    for difference in (-20, -5, 0, 3, 8, 40):
        outcomes += [1.0, 1.0, 1.0, 0.0]  # the same 75% at each difference: length explains nothing
        candidate += [60 + difference] * 4
        baseline += [60] * 4
    # At b = 0 and a = logit(0.75) both gradients vanish: sum(y - p) = 0, and sum((y - p) x) = 0 because
    # each difference's four outcomes sum to 3 = 4 x 0.75. Float64 rounding only.
    assert length_controlled_win_rate(outcomes, candidate, baseline) == pytest.approx(0.75, abs=1e-12)


def test_the_fit_is_the_penalized_maximum_likelihood():
    # At the optimum the gradient vanishes: sum(y - p) = 0 and sum((y - p) x) = penalty b. Soft labels, a
    # length effect and noise, nothing separable; the sums are of 40 terms under 1, so 1e-9 is far below
    # any real departure and far above float64 rounding.
    rng = np.random.default_rng(3)
    x = np.tanh(rng.normal(0, 1, 40))
    chance = 1 / (1 + np.exp(-(0.4 + 1.5 * x))) + rng.normal(0, 0.3, 40)
    labels = np.round(np.clip(chance, 0, 1) * 2) / 2  # outcomes are 0, 0.5 or 1
    a, b = fit_length_logistic(labels, x)
    p = 1 / (1 + np.exp(-(a + b * x)))
    assert abs((labels - p).sum()) < 1e-9
    assert abs(((labels - p) * x).sum() - SLOPE_PENALTY * b) < 1e-9
    assert b > 0.5  # the length effect is found
    # and the separable case stays finite: the penalty bounds b
    a, b = fit_length_logistic(np.array([0.0, 0.0, 1.0, 1.0]), np.array([-0.5, -0.1, 0.1, 0.5]))
    assert math.isfinite(a) and 1 < b < 100
