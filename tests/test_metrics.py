import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix

from fairtune.metrics import cell_tallies, evaluate_predictions, fairness_report, objective_value


def sklearn_reference(labels, preds, groups, num_classes, num_groups):
    """acc[g, c] from one scikit-learn confusion matrix per group: diagonal / row sum."""
    acc = np.full((num_groups, num_classes), np.nan)
    for g in range(num_groups):
        mask = groups == g
        if not mask.any():
            continue
        cm = confusion_matrix(labels[mask], preds[mask], labels=list(range(num_classes)))
        rows = cm.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc[g] = np.where(rows > 0, 100.0 * np.diag(cm) / rows, np.nan)
    gaps = []
    for c in range(num_classes):
        col = acc[:, c][~np.isnan(acc[:, c])]
        if len(col) >= 2:
            gaps.append(col.max() - col.min())
    deo_a = float(np.mean(gaps)) if gaps else 0.0
    deo_m = float(np.max(gaps)) if gaps else 0.0
    return acc, deo_a, deo_m, 100.0 * float(np.mean(labels == preds))


def test_hand_made_two_groups():
    # class 0: group 0 gets 2/2 right, group 1 gets 1/2 -> gap 50; class 1: 1/2 vs 2/2 -> gap 50... make one differ
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    groups = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 1])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 0])
    r = evaluate_predictions(labels, preds, groups=groups, num_classes=2, num_groups=2)
    assert r.acc_matrix == [[100.0, 50.0], [50.0, pytest.approx(200 / 3)]]
    assert r.deo_a == pytest.approx((50 + (200 / 3 - 50)) / 2)
    assert r.deo_m == pytest.approx(50.0)
    assert r.accuracy == pytest.approx(100 * 6 / 9)
    assert r.cell_counts == [[2, 2], [2, 3]]
    assert r.empty_cells == []


def test_four_groups_and_empty_cells_are_reported_not_nan():
    # 3 classes x 4 groups; group 3 has no sample of class 0, class 2 appears in group 1 only.
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 3, 1, 1])
    preds = torch.tensor([0, 1, 0, 1, 1, 0, 0, 2, 0])
    r = evaluate_predictions(labels, preds, groups=groups, num_classes=3, num_groups=4)
    assert r.acc_matrix[3][0] is None and r.acc_matrix[0][2] is None
    assert (3, 0) in r.empty_cells and (0, 2) in r.empty_cells
    assert r.classes_without_gap == [2]
    # class 0: groups 0,1,2 -> 100, 0, 100: gap 100; class 1: 100,100,0,0: gap 100
    assert r.deo_a == pytest.approx(100.0) and r.deo_m == pytest.approx(100.0)
    assert not math.isnan(r.deo_a)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 5),
    st.integers(2, 4),
    st.integers(1, 200),
    st.integers(0, 2**31 - 1),
)
def test_matches_sklearn_per_group_confusion(num_classes, num_groups, n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    groups = rng.integers(0, num_groups, n)
    preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, num_classes, n))
    acc, deo_a, deo_m, accuracy = sklearn_reference(labels, preds, groups, num_classes, num_groups)
    r = evaluate_predictions(
        torch.tensor(labels), torch.tensor(preds), groups=torch.tensor(groups), num_classes=num_classes, num_groups=num_groups
    )
    ours = np.array([[np.nan if v is None else v for v in row] for row in r.acc_matrix])
    np.testing.assert_allclose(ours, acc, equal_nan=True)
    assert r.deo_a == pytest.approx(deo_a) and r.deo_m == pytest.approx(deo_m)
    assert r.accuracy == pytest.approx(accuracy)
    assert r.deo_a <= r.deo_m + 1e-9


def test_tallies_add_up_across_batches():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1000,), generator=gen)
    groups = torch.randint(0, 2, (1000,), generator=gen)
    preds = torch.randint(0, 10, (1000,), generator=gen)
    whole = fairness_report(*cell_tallies(labels, preds, groups=groups, num_classes=10, num_groups=2))
    parts = [cell_tallies(labels[i : i + 128], preds[i : i + 128], groups=groups[i : i + 128], num_classes=10, num_groups=2)
             for i in range(0, 1000, 128)]
    summed = fairness_report(sum(p[0] for p in parts), sum(p[1] for p in parts))
    assert whole == summed


def test_objectives():
    assert objective_value("acc-deo_a", accuracy=80, deo_a=10, deo_m=30) == 70
    assert objective_value("acc-deo_m", accuracy=80, deo_a=10, deo_m=30) == 50
    assert objective_value("deo_m", accuracy=80, deo_a=10, deo_m=30) == 30
    with pytest.raises(ValueError, match="valid"):
        objective_value("f1", accuracy=80, deo_a=10, deo_m=30)


def test_empty_split_is_an_error():
    with pytest.raises(ValueError):
        fairness_report(torch.zeros(2, 2), torch.zeros(2, 2))


def test_a_multi_objective_names_two_metrics_and_scalarises_them_bigger_is_better():
    from fairtune.metrics import parse_objective

    goal = parse_objective("deo_a, acc")
    assert goal.text == "acc,deo_a" and goal.metrics == ("acc", "deo_a") and goal.multi  # canonical order
    assert goal.directions == ("max", "min") and goal.mode == "max" and goal.scalar_text == "acc-deo_a"
    assert goal.values(accuracy=80.25, deo_a=10.5, deo_m=30) == (80.25, 10.5)
    # Its scalar is exactly the default objective's, for ASHA, the ledger and best.json alike.
    assert objective_value("acc,deo_a", accuracy=80.1, deo_a=10.3, deo_m=30) == objective_value("acc-deo_a", accuracy=80.1, deo_a=10.3, deo_m=30)
    fair = parse_objective("deo_m,deo_a")
    assert fair.text == "deo_a,deo_m" and fair.directions == ("min", "min") and fair.scalar_text == "-deo_a-deo_m"
    assert fair.value(accuracy=80, deo_a=10, deo_m=30) == -40
    scalar = parse_objective("deo_m")
    assert not scalar.multi and scalar.directions == ("min",) and scalar.values(accuracy=80, deo_a=10, deo_m=30) == (30,)


@pytest.mark.parametrize("text, fragment", [
    ("acc,f1", "unknown metric 'f1'"), ("acc,", "unknown metric ''"), ("acc,acc", "names acc twice"),
    ("acc,deo_a,deo_m", "names 3 metrics"), ("f1", "invalid choice: 'f1'"),
])
def test_a_bad_objective_is_one_line(text, fragment):
    from fairtune.metrics import parse_objective

    with pytest.raises(ValueError, match=fragment) as caught:
        parse_objective(text)
    assert len(str(caught.value).splitlines()) == 1
