"""Selection rules on hand-made trial tables (no Ray): each rule's pick, ties, the empty constrained
set; the Pareto set; the 2-D hypervolume against independent formulations."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from fairtune.errors import UserError
from fairtune.selection import BEST, hypervolume_2d, pareto_mask, pareto_set, parse_rule, rule_metrics, select_trial


def table(*rows, statuses=None) -> pd.DataFrame:
    """A trials.csv as the search writes it: rows of (trial id, accuracy, DEO_A, DEO_M[, status])."""
    records = []
    for row in rows:
        trial_id, accuracy, deo_a, deo_m, *status = row
        records.append({
            "trial_id": trial_id, "lam": 0.1 * len(records) + 0.1, "epochs_run": 3, "status": status[0] if status else "COMPLETED",
            "error": "", "final_accuracy": accuracy, "final_deo_a": deo_a, "final_deo_m": deo_m,
            "final_objective": accuracy - deo_a,
        })
    return pd.DataFrame(records)


def pick(trials, rule, objective="acc-deo_a") -> str:
    return select_trial(trials, parse_rule(rule), objective)["trial_id"]


# -- independent references: plain loops over the definitions in fairtune/selection.py's docstring --


def reference_losses(trials, metrics):
    """Per completed trial: {id: (normalised loss of metric 1, of metric 2)}, 0 best, 1 worst."""
    done = trials[trials["status"] == "COMPLETED"]
    columns = {"acc": "final_accuracy", "deo_a": "final_deo_a", "deo_m": "final_deo_m"}
    out = {row.trial_id: [] for row in done.itertuples()}
    for metric in metrics:
        values = {row.trial_id: getattr(row, columns[metric]) for row in done.itertuples()}
        best = max(values.values()) if metric == "acc" else min(values.values())
        worst = min(values.values()) if metric == "acc" else max(values.values())
        for trial_id, value in values.items():
            out[trial_id].append(0.0 if best == worst else abs(value - best) / abs(worst - best))
    return out


def creation_order(trial_id):
    return int(trial_id[1:])


def reference_utopia(trials, metrics):
    losses = reference_losses(trials, metrics)
    return min(losses, key=lambda t: (round(math.dist(losses[t], (0, 0)), 9), creation_order(t)))


def reference_knee(trials, metrics):
    losses = reference_losses(trials, metrics)
    front = [t for t in losses if not any(
        all(losses[o][k] <= losses[t][k] for k in (0, 1)) and losses[o] != losses[t] for o in losses)]
    most_accurate = min(front, key=lambda t: (losses[t][0], creation_order(t)))
    if len(front) <= 2:
        return most_accurate
    (ax, ay), (bx, by) = losses[min(front, key=lambda t: losses[t][0])], losses[min(front, key=lambda t: losses[t][1])]
    if (ax, ay) == (bx, by):  # the front is copies of one point
        return most_accurate
    # The ideal point is the origin: a point on its side of the chord has a smaller a*x + b*y than the chord's c.
    a, b, c = ay - by, bx - ax, (ay - by) * ax + (bx - ax) * ay
    if c < 0:
        a, b, c = -a, -b, -c
    gap = {t: (c - a * losses[t][0] - b * losses[t][1]) / math.hypot(a, b) for t in front}
    inside = [t for t in front if round(gap[t], 9) > 0]
    if not inside:
        return most_accurate
    return min(inside, key=lambda t: (-round(gap[t], 9), creation_order(t)))


# -- best -----------------------------------------------------------------------------------------


def test_best_is_the_highest_final_objective_among_completed_trials():
    trials = table(("t000", 80, 10, 20), ("t001", 95, 5, 9, "STOPPED"), ("t002", 85, 12, 20), ("t003", 70, 1, 2))
    objectives = {"t000": 70, "t002": 73, "t003": 69}  # t001 scores 90 but was stopped by ASHA
    assert pick(trials, "best") == max(objectives, key=objectives.get)
    # A minimised objective picks the smallest.
    trials["final_objective"] = trials["final_deo_a"]
    assert pick(trials, "best", "deo_a") == "t003"


def test_best_ties_go_to_the_lower_trial_id_whatever_the_row_order():
    trials = table(("t1000", 80, 10, 20), ("t010", 75, 5, 9), ("t999", 80, 10, 20), ("t002", 60, 30, 40))
    assert pick(trials, "best") == "t010"  # 70 for t010, t999 and t1000: created first wins
    assert pick(trials.iloc[::-1], "best") == "t010"
    assert pick(trials[trials["trial_id"] != "t010"], "best") == "t999"  # t999 was created before t1000


def test_best_falls_back_on_stopped_trials_when_none_completed():
    trials = table(("t000", 80, 10, 20, "STOPPED"), ("t001", 90, 10, 20, "STOPPED"), ("t002", 99, 0, 0, "ERROR"))
    trials.loc[2, ["final_accuracy", "final_deo_a", "final_deo_m", "final_objective"]] = np.nan  # failed at once
    assert pick(trials, "best") == "t001"
    with pytest.raises(UserError, match="--select utopia: no trial of the search ran every epoch"):
        pick(trials, "utopia")
    with pytest.raises(UserError, match="no trial of the search reported a result"):
        pick(trials.iloc[[2]], "best")


def test_best_agrees_with_the_searchs_best_record(tmp_path):
    from fairtune.data import DataOptions
    from fairtune.engine import TrainConfig
    from fairtune.spaces import SearchSpace
    from fairtune.tune.search import SearchSettings, best_record

    space = SearchSpace("mfd", "lam", "loguniform", low=1e-4, high=100.0, default=1.0)
    trials = table(("t000", 80, 10, 20), ("t001", 85, 15, 20), ("t002", 82, 8, 11), ("t003", 90, 1, 3, "STOPPED"))
    for objective in ("acc-deo_a", "acc,deo_a"):
        settings = SearchSettings(TrainConfig("mfd", epochs=3, objective=objective), DataOptions("fmnist-s"), tmp_path, tmp_path)
        record = best_record(trials, settings, space, 3, 1.0)
        chosen = select_trial(trials, BEST, objective)
        assert record.trial_id == chosen["trial_id"] == "t002"  # 74 beats 70 and 70; t003 stopped
        assert record.hyperparameters["lam"] == pytest.approx(chosen["lam"])
        assert record.val.accuracy == 82 and record.objective == objective and record.mode == "max"
        assert ("scalarised" in record.to_json()) == (objective == "acc,deo_a")  # only a multi-objective search's
    # A multi-objective search's best.json also names its objectives and lists its Pareto set.
    assert record.objectives == {"acc": "max", "deo_a": "min"} and record.scalarised == "acc-deo_a"
    assert record.pareto_trials == ["t001", "t002"]  # t000 (80, 10) is beaten by t002 (82, 8)


# -- constrained ----------------------------------------------------------------------------------


def test_constrained_takes_the_most_accurate_trial_within_the_bound():
    trials = table(
        ("t000", 90, 6.0, 9), ("t001", 84, 2.5, 30), ("t002", 86, 2.0, 3, "STOPPED"), ("t003", 80, 1.0, 2), ("t004", 88, 2.6, 3),
    )
    assert pick(trials, "constrained:deo_a<=2.5") == "t001"  # the bound is inclusive; t002 was stopped
    assert pick(trials, "constrained:deo_a<=2.4") == "t003"
    assert pick(trials, "constrained:deo_a<=100") == "t000"
    assert pick(trials, "constrained:deo_m<=9") == "t000"
    assert pick(trials, "constrained:deo_m<=5") == "t004"


def test_constrained_ties_go_to_the_lower_trial_id():
    trials = table(("t007", 85, 1.0, 2), ("t003", 85, 2.0, 2), ("t001", 90, 5.0, 2))
    assert pick(trials, "constrained:deo_a<=2") == "t003"


def test_constrained_with_no_trial_within_the_bound_names_the_closest():
    trials = table(("t000", 90, 6.0, 9), ("t001", 84, 2.5, 30), ("t002", 86, 0.5, 3, "STOPPED"), ("t003", 80, 2.5, 2))
    with pytest.raises(UserError) as caught:
        select_trial(trials, parse_rule("constrained:deo_a<=2"), where="the mfd search")
    message = str(caught.value)
    assert "no completed trial of the mfd search has validation deo_a <= 2" in message
    assert "the closest is t001 with deo_a 2.5" in message  # t001 and t003 tie at 2.5; t002 (0.5) was stopped
    assert len(message.splitlines()) == 1


# -- utopia ---------------------------------------------------------------------------------------


def test_utopia_is_the_trial_nearest_the_normalised_ideal_point():
    # Accuracy spans 70..90 and DEO_A 2..10: normalised (0, 1), (0.5, 0.25), (1, 0); t001 is nearest (0, 0).
    trials = table(("t000", 90, 10, 1), ("t001", 80, 4, 50), ("t002", 70, 2, 1), ("t003", 95, 0, 0, "STOPPED"))
    assert pick(trials, "utopia") == "t001" == reference_utopia(trials, ("acc", "deo_a"))
    # A multi-objective search weighs its own two objectives: on accuracy and DEO_M t001 is far off.
    assert pick(trials, "utopia", "acc,deo_m") == reference_utopia(trials, ("acc", "deo_m")) == "t000"
    assert pick(trials, "utopia", "deo_a,deo_m") == reference_utopia(trials, ("deo_a", "deo_m")) == "t002"


def test_utopia_ties_go_to_the_lower_trial_id():
    trials = table(("t010", 90, 10, 0), ("t002", 70, 2, 0))  # (0, 1) and (1, 0): both at distance 1
    assert pick(trials, "utopia") == "t002"
    # A metric every trial shares says nothing: here only accuracy decides.
    assert pick(table(("t000", 70, 3, 0), ("t001", 90, 3, 0)), "utopia") == "t001"


# -- knee -----------------------------------------------------------------------------------------


def test_knee_is_the_front_point_farthest_inside_the_chord():
    trials = table(("t000", 90, 10, 0), ("t001", 85, 3, 0), ("t002", 70, 2, 0), ("t003", 60, 1.5, 0), ("t004", 80, 8, 0),
                   ("t005", 99, 0.1, 0, "STOPPED"))
    # Normalised: t000 (0, 1), t001 (1/6, 3/17), t002 (2/3, 1/17), t003 (1, 0); t004 is dominated by t001.
    # Distances inside the chord x + y = 1: t001 0.46, t002 0.19.
    assert pick(trials, "knee") == "t001" == reference_knee(trials, ("acc", "deo_a"))


def test_knee_of_a_short_or_concave_front_is_its_most_accurate_point():
    assert pick(table(("t000", 80, 5, 0), ("t001", 90, 9, 0), ("t002", 70, 9, 0)), "knee") == "t001"  # 2 on the front
    assert pick(table(("t000", 80, 5, 0), ("t001", 85, 4, 0)), "knee") == "t001"  # 1 on the front
    # (90, 10), (80, 9), (60, 1): t001 lies beyond the chord, away from the ideal point — a dent, not a knee.
    concave = table(("t000", 90, 10, 0), ("t001", 80, 9, 0), ("t002", 60, 1, 0))
    assert pick(concave, "knee") == "t000" == reference_knee(concave, ("acc", "deo_a"))


def test_knee_ties_go_to_the_lower_trial_id():
    # Normalised (0, 1), (1, 0), (0.2, 0.3), (0.3, 0.2): the last two equally far inside the chord.
    trials = table(("t000", 100, 10, 0), ("t001", 0, 0, 0), ("t009", 80, 3, 0), ("t004", 70, 2, 0))
    assert pick(trials, "knee") == "t004" == reference_knee(trials, ("acc", "deo_a"))


@pytest.mark.parametrize("seed", range(40))
def test_utopia_and_knee_match_plain_loops_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    accuracy = rng.integers(50, 60, n).astype(float)  # few distinct values: ties and copies happen
    deo = rng.integers(0, 6, n).astype(float)
    statuses = rng.choice(["COMPLETED", "COMPLETED", "STOPPED"], n)
    statuses[0] = "COMPLETED"
    ids = [f"t{i:03d}" for i in rng.permutation(n)]
    trials = table(*[(ids[i], accuracy[i], deo[i], 10 - deo[i], statuses[i]) for i in range(n)])
    for objective in ("acc-deo_a", "acc,deo_m"):
        metrics = rule_metrics(objective)
        assert pick(trials, "utopia", objective) == reference_utopia(trials, metrics)
        assert pick(trials, "knee", objective) == reference_knee(trials, metrics)


# -- the Pareto set -------------------------------------------------------------------------------


def test_pareto_set_holds_exactly_the_completed_trials_nothing_beats():
    trials = table(
        ("t000", 80, 5, 9), ("t001", 80, 5, 9), ("t002", 85, 7, 1), ("t003", 79, 5, 0), ("t004", 90, 9, 9),
        ("t005", 99, 0, 0, "STOPPED"), ("t006", 85, 8, 0),
    )
    # t003 is beaten by t000/t001 (more accurate, as fair); t006 by t002; the copies t000/t001 both stay.
    assert pareto_set(trials)["trial_id"].tolist() == ["t000", "t001", "t002", "t004"]
    # On DEO_A and DEO_M (both minimised) accuracy plays no part.
    assert pareto_set(trials, "deo_a,deo_m")["trial_id"].tolist() == ["t003"]
    assert pareto_set(table(("t000", 1, 1, 1, "STOPPED"))).empty


def test_pareto_mask_against_pairwise_dominance():
    rng = np.random.default_rng(0)
    for _ in range(50):
        points = rng.integers(0, 4, (int(rng.integers(1, 9)), 2)).astype(float)
        expected = [not any((q <= p).all() and (q < p).any() for q in points) for p in points]
        assert pareto_mask(points).tolist() == expected


# -- hypervolume ----------------------------------------------------------------------------------


def grid_hypervolume(points, reference) -> int:
    """Unit cells of the box below ``reference`` that some point dominates (integer points only)."""
    return sum(
        any(x <= i and y <= j for x, y in points)
        for i, j in itertools.product(range(int(reference[0])), range(int(reference[1])))
    )


def test_hypervolume_2d_against_optuna_and_a_grid_count():
    from optuna._hypervolume import compute_hypervolume

    assert hypervolume_2d(np.array([[1.0, 1.0]]), (3.0, 3.0)) == 4.0
    assert hypervolume_2d(np.zeros((0, 2)), (3.0, 3.0)) == 0.0
    assert hypervolume_2d(np.array([[3.0, 1.0], [1.0, 5.0]]), (3.0, 3.0)) == 0.0  # on or beyond the reference: nothing
    rng = np.random.default_rng(1)
    for _ in range(30):
        points = rng.integers(0, 10, (int(rng.integers(1, 9)), 2)).astype(float)
        assert hypervolume_2d(points, (10.0, 10.0)) == grid_hypervolume(points, (10, 10))
        real = rng.uniform(-100, 0, (int(rng.integers(1, 12)), 2))  # as (-accuracy, DEO_A - 100) would be
        assert hypervolume_2d(real, (0.0, 0.0)) == pytest.approx(compute_hypervolume(real, np.zeros(2)), rel=1e-12)
