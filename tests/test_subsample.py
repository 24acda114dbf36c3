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


# ---------------------------------------------------------------- paired eval splits (gray / colour)


def colour_blind_image(images: torch.Tensor) -> torch.Tensor:
    """The gray source of an fmnist-s image, whichever rendering: a full-colour tint keeps one channel
    at 1.0 (hue_to_rgb), so the channel maximum of the tinted image is the gray image itself."""
    return images.amax(dim=1)


def per_class_sources(split: Split, group: int) -> dict[int, list[bytes]]:
    """Class -> sorted source images (as bytes) of one group, collected with a plain loop."""
    found: dict[int, list[bytes]] = {}
    gray = colour_blind_image(split.images)
    for i in range(len(split)):
        if int(split.groups[i]) == group:
            found.setdefault(int(split.labels[i]), []).append(gray[i].numpy().tobytes())
    return {c: sorted(v) for c, v in found.items()}


@pytest.fixture
def fmnist_root(tmp_path, monkeypatch):
    from fairtune.data import skewed
    from tests.fixtures.idx import write_fashion_mnist

    write_fashion_mnist(tmp_path, n_train_per_class=60, n_test_per_class=50, seed=4)
    monkeypatch.setattr(skewed, "VAL_PER_CLASS", 40)
    return tmp_path


def test_eval_size_keeps_both_renderings_of_every_image(fmnist_root):
    data = load_dataset(DataOptions("fmnist-s", train_size=200, eval_size=100), fmnist_root)
    for name in ("val", "test"):
        split = getattr(data, name)
        assert len(split) == 100
        assert split.cell_counts(10, 2).tolist() == [[5] * 10, [5] * 10], name
        # the same 5 source images per class, once gray and once in colour
        assert per_class_sources(split, 0) == per_class_sources(split, 1), name
        n = len(split) // 2
        assert torch.equal(colour_blind_image(split.images[:n]), colour_blind_image(split.images[n:])), name
    # train stays a per-cell draw of single renderings
    assert data.train.sources is None and len(data.train) == 200


def test_colour_blind_model_is_exactly_fair_on_a_subsampled_test_split(fmnist_root):
    from fairtune.metrics import evaluate_predictions

    test = load_dataset(DataOptions("fmnist-s", eval_size=200), fmnist_root).test
    # a deterministic, colour-blind "model": right on about half of the images, by a hash of the pixels
    pixel_sum = colour_blind_image(test.images).long().sum(dim=(1, 2))
    predictions = torch.where(pixel_sum % 2 == 0, test.labels, (test.labels + 1) % 10)
    report = evaluate_predictions(test.labels, predictions, groups=test.groups, num_classes=10, num_groups=2)
    assert 20 < report.accuracy < 80
    assert report.deo_a == 0.0 and report.deo_m == 0.0


def test_source_subsample_draws_sources_per_class_in_proportion():
    from fairtune.data.base import source_subsample

    # 3 classes with 30, 60, 10 source images, each shown in 2 groups: rows [all group 0 | all group 1]
    labels = torch.tensor([0] * 30 + [1] * 60 + [2] * 10)
    n = len(labels)
    images = torch.arange(n).view(n, 1, 1, 1).expand(n, 3, 2, 2).repeat(2, 1, 1, 1)
    full = Split(images, labels.repeat(2), torch.tensor([0] * n + [1] * n), sources=torch.arange(n).repeat(2))
    sub = source_subsample(full, 41, 3, seed=7)  # odd: 20 sources, 40 samples
    assert len(sub) == 40 and sub.cell_counts(3, 2).tolist() == [[6, 12, 2], [6, 12, 2]]
    gray, colour = sub.groups == 0, sub.groups == 1
    assert torch.equal(sub.sources[gray], sub.sources[colour])  # order kept: gray block, then colour block
    assert torch.equal(sub.images[gray], sub.images[colour])
    assert torch.equal(sub.labels, labels[sub.sources])
    again, other = source_subsample(full, 41, 3, seed=7), source_subsample(full, 41, 3, seed=8)
    assert torch.equal(again.sources, sub.sources) and not torch.equal(other.sources, sub.sources)
    assert source_subsample(full, 1, 3, seed=0).cell_counts(3, 2).tolist() == [[1, 1, 1], [1, 1, 1]]  # no class lost
