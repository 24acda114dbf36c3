"""Test-session setup: Ray (when a test needs it) starts once, loopback-only, with 2 CPUs and one
logical GPU, so fractional --gpus-per-trial packing is exercised on a CPU-only machine."""

import os

import pytest

from fairtune import plugin
from fairtune.tune.cluster import prepare_environment

# The suite runs as a fresh user would: a developer's own plugins or data folder must not change
# what it checks (Ray's workers would inherit them too).
for _name in (plugin.ENV, "FAIRTUNE_DATA"):
    os.environ.pop(_name, None)
# Before anything imports ray: the loopback-only and save-every-step settings fairtune itself uses.
prepare_environment(None)


@pytest.fixture(autouse=True)
def isolated_process_state():
    """What a command changes for its whole process is undone after each test: the plugins it loaded
    or registered (a fuzzed ``--plugin`` included) and torch's thread count (``--threads``), which
    would change later tests' floating-point sums."""
    import torch

    threads = torch.get_num_threads()
    with plugin.isolated():
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from fairtune.tune.cluster import connect

    connect(None, num_cpus=2, num_gpus=1)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Fashion-MNIST IDX files for the end-to-end tests, written once. 520 per class: fmnist-s holds
    out 500 per class for validation before any subsample."""
    from tests.fixtures.idx import write_fashion_mnist

    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root, n_train_per_class=520, n_test_per_class=20)
    return root
