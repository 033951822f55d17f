"""Clients in parallel (-pc, flcore/parallel.py): a run with two worker processes equals the sequential run bit for
bit (curves and checkpointed client states, memory and disk stores, forked and spawned workers); a run killed
with -pc resumes, with or without -pc; the shares balance the clients' costs; bad values and a worker's errors
are one-line errors."""
import multiprocessing

import numpy as np
import pytest
import torch

from flcore.errors import UserError
from flcore.parallel import balanced_shares, worker_gpu
from flcore.runner import Runner
from flutils import experiment
from flutils.results import read_h5

# Stragglers and lost uploads, as in test_client_store.py: clients left behind and replies waiting for them.
ROUND_FLAGS = ["-gr", "2", "-jr", "0.75", "-cdr", "0.5", "--shots", "20", "--num_threads", "1"]
ALGORITHM_FLAGS = {
    "FedKTL-stylegan-3": ["-se", "3", "-sbs", "8", "--image_every", "0"],
    "FedProto": [],
    "FedL2G-feat": [],
    "FedL2G-logit": [],
    "FedMRL": ["-sfd", "16"],
}
CURVES = ("rs_test_acc", "rs_test_auc", "rs_train_loss", "rs_test_acc_std", "upload_floats", "download_floats",
          "rs_client_acc", "rs_client_auc", "rs_client_loss", "rs_client_train_loss", "client_test_samples")


class Killed(Exception):
    pass


def argv_of(small_run, tmp_path, algorithm, goal, *extra):
    return small_run("-algo", algorithm, *ROUND_FLAGS, *ALGORITHM_FLAGS[algorithm], "-go", goal,
                     "-sfn", str(tmp_path / f"ckpt_{goal}"), *extra)


def curves(tmp_path, algorithm, goal):
    return read_h5(str(tmp_path / "results" / f"Digits_{algorithm}_{goal}_0.h5"))


def checkpoint(tmp_path, algorithm, goal):
    return torch.load(tmp_path / f"ckpt_{goal}" / f"Digits_{algorithm}_{goal}_0.pt", weights_only=True)


def assert_same_curves(actual, expected):
    for key in CURVES:
        assert np.array_equal(actual[key], expected[key], equal_nan=True), key


@pytest.mark.parametrize("algorithm", list(ALGORITHM_FLAGS))
def test_two_workers_give_the_sequential_run_bit_for_bit(small_run, tmp_path, algorithm, assert_same_state):
    assert experiment.main(argv_of(small_run, tmp_path, algorithm, "seq")) == 0
    assert experiment.main(argv_of(small_run, tmp_path, algorithm, "pc", "-pc", "2")) == 0
    assert_same_curves(curves(tmp_path, algorithm, "pc"), curves(tmp_path, algorithm, "seq"))
    sequential, parallel = checkpoint(tmp_path, algorithm, "seq"), checkpoint(tmp_path, algorithm, "pc")
    assert parallel["clients"]["store"] == "memory" and len(parallel["clients"]["states"]) == 4
    assert_same_state(parallel["clients"], sequential["clients"])
    assert_same_state(parallel["pending"], sequential["pending"])


def test_spawned_workers_give_the_sequential_run_bit_for_bit(small_run, tmp_path, monkeypatch, assert_same_state):
    """Workers of more than one thread, and on CUDA, are spawned rather than forked: the same run either way."""
    algorithm = "FedKTL-stylegan-3"
    monkeypatch.setattr("flcore.parallel.multiprocessing.get_all_start_methods", lambda: ["spawn"])
    assert experiment.main(argv_of(small_run, tmp_path, algorithm, "seq")) == 0
    assert experiment.main(argv_of(small_run, tmp_path, algorithm, "spawned", "-pc", "2")) == 0
    assert_same_curves(curves(tmp_path, algorithm, "spawned"), curves(tmp_path, algorithm, "seq"))
    assert_same_state(checkpoint(tmp_path, algorithm, "spawned")["clients"],
                      checkpoint(tmp_path, algorithm, "seq")["clients"])


@pytest.mark.parametrize("first,second,store", [("2", "2", "disk"), ("2", "1", "memory"), ("1", "2", "memory")])
def test_a_run_killed_with_parallel_clients_resumes_exactly(small_run, tmp_path, monkeypatch, first, second, store):
    """Killed after round 1's checkpoint, resumed with the same or another -pc: the uninterrupted curves."""
    algorithm = "FedKTL-stylegan-3"
    assert experiment.main(argv_of(small_run, tmp_path, algorithm, "whole")) == 0
    save = Runner.save_checkpoint

    def save_then_die(server):
        save(server)
        if server.round == 1:
            raise Killed

    killed = argv_of(small_run, tmp_path, algorithm, "killed", "--client_state", store)
    monkeypatch.setattr(Runner, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        experiment.main(killed + ["-pc", first])
    monkeypatch.undo()
    assert experiment.main(killed + ["-pc", second, "--resume"]) == 0
    assert_same_curves(curves(tmp_path, algorithm, "killed"), curves(tmp_path, algorithm, "whole"))
    if store == "disk":  # each worker's store kept its own clients' files, and only those the checkpoint needs
        files = checkpoint(tmp_path, algorithm, "killed")["clients"]["files"]
        folder = tmp_path / "ckpt_killed" / "client_state" / f"Digits_{algorithm}_killed_0"
        assert sorted(files) == [0, 1, 2, 3]
        assert sorted(path.name for path in folder.glob("*.safetensors")) == sorted(files.values())


def test_shares_balance_the_costs():
    shares = balanced_shares([8.0, 1.0, 8.0, 1.0, 4.0, 4.0], 2)
    assert shares == [[0, 1, 4], [2, 3, 5]]  # 8 + 4 + 1 each
    assert sorted(sum(shares, [])) == list(range(6))
    assert balanced_shares([1.0, 1.0], 3) == [[0], [1], []]


def test_a_bad_worker_count_is_a_one_line_error(small_run, error_line):
    line = error_line(experiment.main, small_run("-pc", "0"))
    assert "-pc must be >= 1" in line


def test_workers_share_gpus_in_blocks_of_workers_per_gpu():
    # One worker per GPU: round robin from -did; N per GPU: N consecutive workers on each, then the next GPU.
    assert [worker_gpu(k, 1, 1, 2) for k in range(4)] == [1, 0, 1, 0]
    assert [worker_gpu(k, 0, 4, 1) for k in range(4)] == [0, 0, 0, 0]
    assert [worker_gpu(k, 1, 2, 4) for k in range(6)] == [1, 1, 2, 2, 3, 3]
    assert [worker_gpu(k, 0, 2, 2) for k in range(6)] == [0, 0, 1, 1, 0, 0]


def test_workers_per_gpu_changes_nothing_on_the_cpu_and_must_be_positive(small_run, tmp_path, error_line):
    assert "--workers_per_gpu must be >= 1" in error_line(experiment.main, small_run("--workers_per_gpu", "0"))
    flags = ("-algo", "FedProto", "-gr", "1", "--shots", "20", "--num_threads", "1", "-pc", "2")
    assert experiment.main(small_run(*flags, "-go", "one")) == 0
    assert experiment.main(small_run(*flags, "-go", "two", "--workers_per_gpu", "2")) == 0
    one, two = curves(tmp_path, "FedProto", "one"), curves(tmp_path, "FedProto", "two")
    for key in CURVES:
        assert np.array_equal(one[key], two[key], equal_nan=True), key


def test_a_workers_error_is_one_line_and_ends_every_worker(small_run, monkeypatch, error_line):
    """A client that cannot be built in its worker (forked: it inherits this patch) stops the run with the
    worker's one-line message, and no worker is left behind."""
    from flcore.servers.serverproto import ServerFedProto

    build = ServerFedProto.new_client.__func__

    def refuse_client_3(cls, setup, spec):
        if setup.client_id == 3:
            raise UserError("client 3 cannot take part; use another family")
        return build(cls, setup, spec)

    monkeypatch.setattr(ServerFedProto, "new_client", classmethod(refuse_client_3))
    line = error_line(experiment.main, small_run("-algo", "FedProto", "-pc", "2", "--num_threads", "1"))
    assert "client 3 cannot take part" in line
    assert multiprocessing.active_children() == []
