import pytest
import torch

from fairtune.data.sampler import balanced_per_cell, balanced_plan, random_plan


def skewed_cells(counts: dict[tuple[int, int], int]):
    labels, groups = [], []
    for (c, g), n in counts.items():
        labels += [c] * n
        groups += [g] * n
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    return torch.tensor(labels)[perm], torch.tensor(groups)[perm]


def test_random_plan_drops_last_partial_batch_and_covers_without_repeats():
    plan = random_plan(1000, 128, torch.Generator().manual_seed(0))
    assert plan.shape == (7, 128)
    assert len(set(plan.flatten().tolist())) == 7 * 128


def test_balanced_batches_have_equal_cell_counts():
    # 10 classes x 2 groups, skew 0.9: majority cells 90, minority 10 (one minority cell only 3).
    counts = {(c, g): (90 if (g == 0) == (c < 5) else 10) for c in range(10) for g in range(2)}
    counts[(7, 0)] = 3
    labels, groups = skewed_cells(counts)
    plan = balanced_plan(labels, groups, 10, 2, 128, torch.Generator().manual_seed(0))
    per = balanced_per_cell(128, 10, 2)
    assert per == 6
    assert plan.shape == (90 // per, 120)  # epoch length set by the largest cell
    for batch in plan:
        cell = groups[batch] * 10 + labels[batch]
        assert torch.bincount(cell, minlength=20).tolist() == [per] * 20


def test_every_sample_appears_each_epoch_and_minorities_are_oversampled():
    counts = {(c, g): (60 if (g == 0) == (c < 2) else 7) for c in range(3) for g in range(2)}
    labels, groups = skewed_cells(counts)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # several epochs from one generator
        plan = balanced_plan(labels, groups, 3, 2, 64, gen)
        per = 64 // 6
        assert plan.shape[0] == 60 // per
        seen = torch.bincount(plan.flatten(), minlength=len(labels))
        assert (seen > 0).all(), "a sample of some cell was never drawn this epoch"
        minority = torch.tensor([counts[(int(c), int(g))] == 7 for c, g in zip(labels, groups)])
        # drawn as repeated reshuffled passes: each minority sample appears floor or ceil of needed/7 times
        needed = plan.shape[0] * per
        assert set(seen[minority].tolist()) <= {needed // 7, -(-needed // 7)}
        assert set(seen[~minority].tolist()) == {1}


def test_plans_are_deterministic_for_a_generator_state():
    labels, groups = skewed_cells({(0, 0): 40, (0, 1): 5, (1, 0): 6, (1, 1): 40})
    a = balanced_plan(labels, groups, 2, 2, 16, torch.Generator().manual_seed(5))
    b = balanced_plan(labels, groups, 2, 2, 16, torch.Generator().manual_seed(5))
    c = balanced_plan(labels, groups, 2, 2, 16, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_smaller_than_cells_is_refused():
    labels, groups = skewed_cells({(c, g): 5 for c in range(10) for g in range(2)})
    with pytest.raises(ValueError, match="balanced batch"):
        balanced_plan(labels, groups, 10, 2, 16, torch.Generator())
