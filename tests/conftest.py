"""Puts the project's script folders on sys.path, as running their scripts does, and shares fixtures."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for sub in ("system", "dataset", "stylegan"):
    path = os.path.join(REPO, sub)
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """A 4-client federated Digits dataset (Dirichlet 0.1), made once per test session."""
    import generate_Digits

    root = tmp_path_factory.mktemp("datasets")
    assert generate_Digits.main(["--num-clients", "4", "--out", str(root / "Digits")]) == 0
    return root


@pytest.fixture
def small_run(digits_root, tmp_path):
    """Builds main.py flags for a small, fast CPU run on the session's Digits dataset."""
    def argv(*extra, dataset_dir=digits_root):
        return ["-data", "Digits", "-nb", "10", "-nc", "4", "-dev", "cpu", "-m", "HtCPU4", "-fd", "64",
                "--dataset_dir", str(dataset_dir), "--results_dir", str(tmp_path / "results"), *extra]
    return argv


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the test (tiny models train faster so, above all on a busy machine); restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
