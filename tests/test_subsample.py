import pytest
import torch

from fairtune.data import DataOptions, load_dataset
from fairtune.data.base import Split, stratified_subsample
from fairtune.errors import UserError


def cells(split: Split, c: int, g: int) -> torch.Tensor:
    return split.cell_counts(c, g)


def make_split(counts: dict[tuple[int, int], int]) -> Split:
    labels, groups = [], []
    for (c, g), n in counts.items():
        labels += [c] * n
        groups += [g] * n
    n = len(labels)
    return Split(torch.arange(n).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(), torch.tensor(labels), torch.tensor(groups))


def test_proportional_by_cell_and_keeps_rare_cells():
    full = make_split({(0, 0): 900, (0, 1): 100, (1, 0): 50, (1, 1): 950, (2, 0): 1, (2, 1): 499})
    sub = stratified_subsample(full, 250, 3, 2, seed=0)
    assert len(sub) == 250
    got = cells(sub, 3, 2)
    # largest remainder of 250 * count / 2500, with the single-sample cell kept
    assert got[0].tolist() == [90, 5, 1] and got[1].tolist() == [10, 95, 49]
    # the rows are real members of their cells (image value = source index)
    src = sub.images[:, 0, 0, 0].long()
    assert torch.equal(full.labels[src], sub.labels) and torch.equal(full.groups[src], sub.groups)


def test_deterministic_per_seed_and_different_across_seeds():
    full = make_split({(0, 0): 300, (0, 1): 300, (1, 0): 300, (1, 1): 300})
    a = stratified_subsample(full, 100, 2, 2, seed=1)
    b = stratified_subsample(full, 100, 2, 2, seed=1)
    c = stratified_subsample(full, 100, 2, 2, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_registry_applies_sizes_and_refuses_fewer_than_the_cells(tmp_path):
    from tests.fixtures.idx import write_fashion_mnist
    from fairtune.data import skewed

    write_fashion_mnist(tmp_path, n_train_per_class=40, n_test_per_class=10)
    old = skewed.VAL_PER_CLASS
    skewed.VAL_PER_CLASS = 5
    try:
        data = load_dataset(DataOptions("fmnist-s", train_size=100, eval_size=60), tmp_path)
        assert (len(data.train), len(data.val), len(data.test)) == (100, 60, 60)
        assert data.test.cell_counts(10, 2).tolist() == [[3] * 10, [3] * 10]
        with pytest.raises(UserError, match="--train-size 10 is below the 20"):
            load_dataset(DataOptions("fmnist-s", train_size=10), tmp_path)
    finally:
        skewed.VAL_PER_CLASS = old
