"""main.py end to end with `Local`, the round loop's flags, and every bad input as a one-line error."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from flcore.servers.serverlocal import ServerLocal
from flutils import experiment
from flutils.data import load_federated_dataset
from flutils.options import parse_args
from flutils.results import read_h5

MAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "system", "main.py")
H5_KEYS = {"rs_test_acc", "rs_test_auc", "rs_test_acc_std", "rs_train_loss", "eval_rounds", "round_time",
           "upload_floats", "download_floats", "time_train", "time_eval"}


def results_of(argv):
    return os.path.join(argv[argv.index("--results_dir") + 1])


def test_local_two_rounds_end_to_end(small_run):
    argv = small_run("-algo", "Local", "-gr", "2", "-t", "2")
    assert experiment.main(argv) == 0
    results = results_of(argv)
    runs = [read_h5(os.path.join(results, f"Digits_Local_test_{r}.h5")) for r in range(2)]
    for data in runs:
        assert H5_KEYS <= set(data)
        assert list(data["eval_rounds"]) == [0, 1, 2]
        assert len(data["round_time"]) == 2 and np.all(data["round_time"] > 0)
        assert np.all(data["upload_floats"] == 0) and np.all(data["download_floats"] == 0)
        assert data["rs_test_acc"].max() > 0.2, "Local should beat chance (0.1) on label-skewed Digits"
        assert np.all((data["rs_test_auc"] > 0) & (data["rs_test_auc"] <= 1))
    assert runs[0]["attrs"]["seed"] != runs[1]["attrs"]["seed"]
    assert not np.array_equal(runs[0]["rs_test_acc"], runs[1]["rs_test_acc"]), "runs must differ in seed"
    assert os.path.isfile(os.path.join(results, "Digits_Local_test.png"))
    assert os.path.isfile(os.path.join(results, "Digits_Local_test.json"))


def test_same_seed_gives_the_same_run(small_run):
    first = small_run("-algo", "Local", "-gr", "1")
    assert experiment.main(first) == 0
    again = read_h5(os.path.join(results_of(first), "Digits_Local_test_0.h5"))
    assert experiment.main(first) == 0
    assert np.array_equal(read_h5(os.path.join(results_of(first), "Digits_Local_test_0.h5"))["rs_test_acc"],
                          again["rs_test_acc"])


def make_server(small_run, *extra):
    args = parse_args(small_run("-algo", "Local", *extra))
    return ServerLocal(args, load_federated_dataset(args), 0, torch.device("cpu"))


def test_join_ratio_and_random_join_ratio(small_run):
    server = make_server(small_run, "-jr", "0.5")
    assert all(len(server.select_clients()) == 2 for _ in range(5))
    server = make_server(small_run, "-jr", "0.25", "-rjr", "1")
    counts = {len(server.select_clients()) for _ in range(60)}
    assert counts <= {1, 2, 3, 4} and len(counts) > 1


def test_client_drop_rate_loses_uploads(small_run):
    server = make_server(small_run, "-cdr", "0.5")
    arrived = server.arrived_uploads(server.clients, {c.id: 0.0 for c in server.clients})
    assert len(arrived) == 2 and set(arrived) <= set(server.clients)


def test_time_select_drops_clients_over_the_threshold(small_run):
    server = make_server(small_run, "-ts", "1", "-tth", "1.0")
    seconds = {0: 0.5, 1: 2.0, 2: 0.1, 3: 5.0}
    assert [c.id for c in server.arrived_uploads(server.clients, seconds)] == [0, 2]


def test_slow_clients_train_fewer_epochs(small_run):
    server = make_server(small_run, "-tsr", "0.5", "-ls", "4")
    slow = [c for c in server.clients if c.train_slow]
    assert len(slow) == 2
    for client in server.clients:
        epochs = {client.epochs_this_round() for _ in range(20)}
        assert epochs <= ({1, 2} if client.train_slow else {4})


def test_learning_rate_decay(small_run):
    server = make_server(small_run, "-ld", "1", "-ldg", "0.5", "-lr", "0.1")
    client = server.clients[0]
    client.train()
    assert client.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_auto_break_stops_when_accuracy_stalls(small_run):
    argv = small_run("-algo", "Local", "-gr", "20", "-ab", "1", "-tc", "1", "-lr", "1e-12")
    assert experiment.main(argv) == 0
    data = read_h5(os.path.join(results_of(argv), "Digits_Local_test_0.h5"))
    assert len(data["rs_test_acc"]) < 21


def test_eval_gap(small_run):
    argv = small_run("-algo", "Local", "-gr", "3", "-eg", "2")
    assert experiment.main(argv) == 0
    assert list(read_h5(os.path.join(results_of(argv), "Digits_Local_test_0.h5"))["eval_rounds"]) == [0, 2, 3]


def run_cli(argv):
    return subprocess.run([sys.executable, MAIN, *argv], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, fragment, results_dir):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(results_dir) or not os.listdir(results_dir)


@pytest.fixture
def broken_copy(digits_root, tmp_path):
    """A writable copy of the Digits dataset, to damage."""
    root = tmp_path / "broken"
    shutil.copytree(digits_root / "Digits", root / "Digits")
    return root


@pytest.mark.parametrize("extra,fragment", [
    (["-data", "Cifar10"], "python dataset/generate_Cifar10.py"),
    (["-nb", "100"], "pass -nb 10"),
    (["-nc", "5"], "pass -nc 4"),
    (["-m", "HtFE99"], "HtFE8"),
    (["-algo", "FedNope"], "choose from: Local"),
    (["-jr", "1.5"], "-jr must be in (0, 1]"),
    (["-jr", "0"], "-jr must be in (0, 1]"),
])
def test_bad_flags(small_run, extra, fragment):
    argv = small_run("-algo", "Local", "-gr", "1") + extra
    assert_one_line_error(run_cli(argv), fragment, results_of(argv))


def test_corrupt_npz(small_run, broken_copy):
    with open(broken_copy / "Digits" / "train" / "2.npz", "wb") as f:
        f.write(b"not a zip archive")
    argv = small_run("-algo", "Local", "-gr", "1", dataset_dir=broken_copy)
    assert_one_line_error(run_cli(argv), "corrupt or unreadable", results_of(argv))


def test_client_without_training_data(small_run, broken_copy):
    path = broken_copy / "Digits" / "train" / "1.npz"
    np.savez(path, x=np.zeros((0, 3, 32, 32), np.float32), y=np.zeros(0, np.int64))
    argv = small_run("-algo", "Local", "-gr", "1", dataset_dir=broken_copy)
    assert_one_line_error(run_cli(argv), "client 1 has no training data", results_of(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_falls_back_to_cpu(small_run, capsys):
    argv = small_run("-algo", "Local", "-gr", "0")
    argv[argv.index("-dev") + 1] = "cuda"
    assert experiment.main(argv) == 0
    assert "CUDA is not available here: running on the CPU" in capsys.readouterr().out
