"""main.py end to end with `Local`, the round loop's flags, and every bad input as a one-line error."""
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from flcore.exchange import TurnReply
from flcore.paths import REPO_ROOT
from flutils import experiment

H5_KEYS = {"rs_test_acc", "rs_test_auc", "rs_test_acc_std", "rs_train_loss", "eval_rounds", "round_time",
           "upload_floats", "download_floats", "time_train", "time_eval"}


def test_local_two_rounds_end_to_end(small_run, results_dir, results_of):
    argv = small_run("-algo", "Local", "-gr", "2", "-t", "2")
    assert experiment.main(argv) == 0
    results = results_dir(argv)
    runs = [results_of(argv, run) for run in range(2)]
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


def test_without_flags_main_runs_the_offline_default_experiment(tmp_path, results_of):
    """The README's quick start, but for round 0 only: Digits is built from scikit-learn's copy when missing."""
    argv = ["--dataset_dir", str(tmp_path / "datasets"), "--results_dir", str(tmp_path / "results"), "-gr", "0"]
    assert experiment.main(argv) == 0
    assert os.path.isfile(tmp_path / "datasets" / "Digits" / "config.json")
    assert results_of(argv)["eval_rounds"].tolist() == [0]


def test_same_seed_gives_the_same_run(small_run, results_of):
    argv = small_run("-algo", "Local", "-gr", "1")
    assert experiment.main(argv) == 0
    first = results_of(argv)
    assert experiment.main(argv) == 0
    assert np.array_equal(results_of(argv)["rs_test_acc"], first["rs_test_acc"])


def test_join_ratio_and_random_join_ratio(make_server):
    server = make_server("Local", "-jr", "0.5")
    assert all(len(server.select_clients()) == 2 for _ in range(5))
    server = make_server("Local", "-jr", "0.25", "-rjr", "1")
    counts = {len(server.select_clients()) for _ in range(60)}
    assert counts <= {1, 2, 3, 4} and len(counts) > 1


def test_client_drop_rate_loses_uploads(make_server):
    server = make_server("Local", "-cdr", "0.5")
    arrived = server.arrived_uploads({c.id: TurnReply() for c in server.clients})
    assert len(arrived) == 2 and set(arrived) <= {0, 1, 2, 3}


def test_time_select_drops_clients_over_the_threshold(make_server):
    server = make_server("Local", "-ts", "1", "-tth", "1.0")
    seconds = {0: 0.5, 1: 2.0, 2: 0.1, 3: 5.0}
    assert server.arrived_uploads({i: TurnReply(train_seconds=s) for i, s in seconds.items()}) == [0, 2]


def test_slow_clients_train_fewer_epochs(make_server):
    server = make_server("Local", "-tsr", "0.5", "-ls", "4")
    slow = [c for c in server.clients if c.train_slow]
    assert len(slow) == 2
    for client in server.clients:
        epochs = {client.epochs_this_round() for _ in range(20)}
        assert epochs <= ({1, 2} if client.train_slow else {4})


def test_learning_rate_decay(make_server):
    server = make_server("Local", "-ld", "1", "-ldg", "0.5", "-lr", "0.1")
    client = server.clients[0]
    client.train()
    assert client.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_auto_break_stops_when_accuracy_stalls(small_run, results_of):
    argv = small_run("-algo", "Local", "-gr", "20", "-ab", "1", "-tc", "1", "-lr", "1e-12")
    assert experiment.main(argv) == 0
    assert len(results_of(argv)["rs_test_acc"]) < 21


def test_eval_gap(small_run, results_of):
    argv = small_run("-algo", "Local", "-gr", "3", "-eg", "2")
    assert experiment.main(argv) == 0
    assert list(results_of(argv)["eval_rounds"]) == [0, 2, 3]


@pytest.fixture
def broken_copy(digits_root, tmp_path):
    """A writable copy of the Digits dataset, to damage."""
    root = tmp_path / "broken"
    shutil.copytree(digits_root / "Digits", root / "Digits")
    return root


@pytest.fixture
def refused(small_run, digits_root, tmp_path, results_dir, error_line):
    """refused(*flags, dataset_dir=...): the one-line error of a Local run with these flags, after checking that
    the run wrote neither results nor checkpoints."""
    def run(*flags, dataset_dir=digits_root):
        argv = small_run("-algo", "Local", "-gr", "1", "-sfn", str(tmp_path / "checkpoints"), *flags,
                         dataset_dir=dataset_dir)
        line = error_line(experiment.main, argv)
        assert not os.path.exists(results_dir(argv)) and not os.path.exists(tmp_path / "checkpoints")
        return line
    return run


@pytest.mark.parametrize("extra,fragment", [
    (["-data", "Cifar10"], "python dataset/generate_Cifar10.py"),
    (["-nb", "100"], "pass -nb 10"),
    (["-nc", "5"], "pass -nc 4"),
    (["-m", "HtFE99"], "HtFE8"),
    (["-algo", "FedNope"], "choose from: Local"),
    (["-jr", "1.5"], "-jr must be in (0, 1]"),
    (["-jr", "0"], "-jr must be in (0, 1]"),
])
def test_bad_flags(refused, extra, fragment):
    assert fragment in refused(*extra)


def test_corrupt_npz(refused, broken_copy):
    with open(broken_copy / "Digits" / "train" / "2.npz", "wb") as f:
        f.write(b"not a zip archive")
    assert "corrupt or unreadable" in refused(dataset_dir=broken_copy)


def test_client_without_training_data(refused, broken_copy):
    path = broken_copy / "Digits" / "train" / "1.npz"
    np.savez(path, x=np.zeros((0, 3, 32, 32), np.float32), y=np.zeros(0, np.int64))
    assert "client 1 has no training data" in refused(dataset_dir=broken_copy)


def test_malformed_flag_value_is_a_usage_error(small_run, results_dir, capsys):
    argv = small_run("-algo", "Local", "-ab", "maybe")
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(argv)
    assert exit_info.value.code == 2
    assert "argument -ab/--auto_break: expected a boolean" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not os.path.exists(results_dir(argv))


def test_main_script_exits_2_with_a_one_line_error_from_any_directory(tmp_path):
    """The one run of system/main.py as a process (the other tests call its main in-process): exit status, stderr."""
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "system", "main.py"), "-data", "Cifar10",
                           "-dev", "cpu", "--dataset_dir", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: dataset 'Cifar10' not found")
    assert "python dataset/generate_Cifar10.py" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_falls_back_to_cpu(small_run, capsys):
    argv = small_run("-algo", "Local", "-gr", "0")
    argv[argv.index("-dev") + 1] = "cuda"
    assert experiment.main(argv) == 0
    assert "CUDA is not available here: running on the CPU" in capsys.readouterr().out


def test_a_round_without_any_evaluation_is_recorded_as_nan(make_server, capsys):
    server = make_server("Local")
    server.evaluate({})  # every client's turn failed (Flower nodes down)
    assert all(math.isnan(server.history.values[key][-1]) for key in ("rs_test_acc", "rs_test_auc", "rs_train_loss"))
    assert "no client's evaluation arrived" in capsys.readouterr().out
    assert server.history.evaluations_since_best() == 0 and math.isnan(server.history.best()[0])
