"""Fixtures shared by the test files; the project's packages come from its editable install (pip install -e .)."""
import pytest

from fldata.cli import run as run_generation
from fldata.sources import DIGITS


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """A 4-client federated Digits dataset (Dirichlet 0.1), made once per test session."""
    root = tmp_path_factory.mktemp("datasets")
    assert run_generation(DIGITS, ["--num-clients", "4", "--out", str(root / "Digits")]) == 0
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
