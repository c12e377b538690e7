"""experiments/recipe.py's arithmetic, without training: the budget at which the decay branches reach the baseline's
loss, the branches' decay lengths and the checkpoint interval that hits every branch point."""

from __future__ import annotations

import pytest

from experiments.recipe import DECAY_FRACTION, FULL, QUICK, branch_decay_steps, budget_to_reach


def test_budget_is_interpolated_between_the_end_points_around_the_target():
    points = [(100, 4.0), (200, 3.5), (300, 3.0)]
    assert budget_to_reach(points, 3.25) == pytest.approx(250)
    assert budget_to_reach(points, 3.5) == 200  # an end-point exactly at the target
    assert budget_to_reach(list(reversed(points)), 3.25) == pytest.approx(250)  # any order


def test_the_first_crossing_counts_and_bounds_are_reported_as_such():
    assert budget_to_reach([(100, 4.0), (200, 3.0), (300, 3.1)], 3.5) == pytest.approx(150)  # noise after it
    assert budget_to_reach([(100, 3.0), (200, 2.9)], 3.5) == 100  # reached by the smallest budget: a bound
    assert budget_to_reach([(100, 4.0), (200, 3.6)], 3.5) is None  # not reached within the budgets tried


@pytest.mark.parametrize("budget", [FULL, QUICK])
def test_branches_decay_over_their_own_last_fraction_from_saved_checkpoints(budget):
    for step in budget.branch_at:
        assert step % budget.save_every == 0
        decay = branch_decay_steps(step)
        assert decay == pytest.approx(DECAY_FRACTION * (step + decay))  # exactly: no rounding at these steps
        assert budget.steps // 10 <= step <= budget.steps * (1 - DECAY_FRACTION)  # inside the stable phase
