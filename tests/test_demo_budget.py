"""The demo's time budget: the plan before a seed, and the stop between rounds."""

from __future__ import annotations

from modelsoups.demo.budget import Costs, another_round_fits, ingredients_that_fit

SIZES = {"pool": 3000, "held_out": 2500, "test": 2500}
COSTS = Costs(SIZES, epochs=2, learned_epochs=1, workers=2)
UNIT = 0.003  # seconds per forward pass over one snippet


def test_plan_keeps_every_ingredient_when_it_fits() -> None:
    assert ingredients_that_fit(8, COSTS, UNIT, seconds=1e6) == 8


def test_plan_trims_ingredients_with_the_time_but_never_below_four() -> None:
    fits = [ingredients_that_fit(8, COSTS, UNIT, seconds=s) for s in range(0, 500, 5)]
    assert fits[0] == 4  # the floor, even when nothing fits
    assert fits == sorted(fits)  # more time never trains fewer
    assert 6 in fits and fits[-1] == 8
    # one worker needs a round per ingredient: the same time fits fewer
    one = Costs(SIZES, epochs=2, learned_epochs=1, workers=1)
    assert ingredients_that_fit(8, one, UNIT, seconds=300) < ingredients_that_fit(
        8, COSTS, UNIT, seconds=300
    )


def test_plan_never_asks_for_more_than_wanted() -> None:
    assert ingredients_that_fit(3, COSTS, UNIT, seconds=0) == 3


def test_another_round_fits_when_the_round_and_the_soups_fit() -> None:
    round_seconds = UNIT * COSTS.ingredient()
    soups = UNIT * COSTS.soups(6)
    assert another_round_fits(COSTS, 6, round_seconds, round_seconds + soups + 1)
    assert not another_round_fits(COSTS, 6, round_seconds, round_seconds + soups - 1)


def test_a_slower_round_stops_training_where_the_plan_would_have_gone_on() -> None:
    # planned at UNIT for 6 ingredients; the machine then gets twice as slow
    seconds = UNIT * (COSTS.rounds(6) * COSTS.ingredient() + COSTS.soups(6))
    assert ingredients_that_fit(8, COSTS, UNIT, seconds) == 6
    left_after_two_rounds = seconds - 2 * 2 * UNIT * COSTS.ingredient()
    assert not another_round_fits(COSTS, 6, 2 * UNIT * COSTS.ingredient(), left_after_two_rounds)
    assert another_round_fits(
        COSTS, 6, UNIT * COSTS.ingredient(), seconds - 2 * UNIT * COSTS.ingredient()
    )


def test_more_ingredients_never_make_the_soups_cheaper() -> None:
    costs = [COSTS.soups(k) for k in range(2, 17)]
    assert costs == sorted(costs)
