"""Data shared by the fault-injection tests (the session's local Ray comes from tests/conftest.py)."""

import pytest

from tests.fixtures.idx import write_fashion_mnist


@pytest.fixture(scope="package")
def fmnist_dir(tmp_path_factory):
    """A small Fashion-MNIST in the real IDX format: 520 per class, since fmnist-s holds out 500 per
    class for validation before any --train-size subsample."""
    root = tmp_path_factory.mktemp("fmnist")
    write_fashion_mnist(root, n_train_per_class=520, n_test_per_class=20)
    return root
