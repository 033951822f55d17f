"""Client state between turns (flcore/client_store.py): the disk store gives the same runs as memory, bit for bit;
its files read back exactly and execute nothing; a run killed mid-round or by a full disk resumes from its last
checkpoint; foreign files and unwritable folders are refused in one line; `auto` picks by the estimated size."""
import errno
import glob
import os
import shutil

import numpy as np
import pytest
import torch

import flcore.client_store as client_store
from flcore.client_store import DiskStore, decode, encode
from flutils import experiment
from flutils.results import read_h5

# Stragglers and lost uploads put out-of-date clients and replies to arrived clients in the two rounds.
ROUND_FLAGS = ["-gr", "2", "-jr", "0.75", "-cdr", "0.5", "--shots", "20"]
ALGORITHM_FLAGS = {
    "FedKTL-stylegan-3": ["-se", "3", "-sbs", "8", "--image_every", "0", "-gen", "untrained"],
    "FedKD": [],
    "FedProto": [],
}
CURVES = ("rs_test_acc", "rs_test_auc", "rs_train_loss", "rs_test_acc_std", "upload_floats", "download_floats")


def run(small_run, tmp_path, algorithm, store, goal, *extra):
    argv = small_run("-algo", algorithm, *ROUND_FLAGS, *ALGORITHM_FLAGS[algorithm], "--client_state", store,
                     "-go", goal, "-sfn", str(tmp_path / f"ckpt_{goal}"), *extra)
    status = experiment.main(argv)
    return status, read_h5(str(tmp_path / "results" / f"Digits_{algorithm}_{goal}_0.h5")) if status == 0 else None


def checkpoint_client_states(tmp_path, algorithm, goal):
    """The client states the run's last checkpoint holds, read through whichever store wrote them."""
    state = torch.load(tmp_path / f"ckpt_{goal}" / f"Digits_{algorithm}_{goal}_0.pt", weights_only=True)
    clients = state["clients"]
    if clients["store"] == "memory":
        return clients["states"]
    return [DiskStore.read(os.path.join(clients["folder"], clients["files"][i])) for i in sorted(clients["files"])]


@pytest.mark.parametrize("algorithm", list(ALGORITHM_FLAGS))
def test_disk_store_gives_the_memory_stores_run_bit_for_bit(small_run, tmp_path, algorithm, assert_same_state):
    assert run(small_run, tmp_path, algorithm, "memory", "mem")[0] == 0
    assert run(small_run, tmp_path, algorithm, "disk", "disk")[0] == 0
    memory = read_h5(str(tmp_path / "results" / f"Digits_{algorithm}_mem_0.h5"))
    disk = read_h5(str(tmp_path / "results" / f"Digits_{algorithm}_disk_0.h5"))
    for key in CURVES:
        assert np.array_equal(memory[key], disk[key], equal_nan=True), key
    assert_same_state(checkpoint_client_states(tmp_path, algorithm, "disk"),
                checkpoint_client_states(tmp_path, algorithm, "mem"))
    # What stays on disk after the run is exactly what its last checkpoint refers to.
    store_folder = tmp_path / "ckpt_disk" / "client_state" / f"Digits_{algorithm}_disk_0"
    assert len(glob.glob(str(store_folder / "*.safetensors"))) == 4


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_checkpoint_from_before_the_stores_resumes(small_run, tmp_path, store):
    """Checkpoints written before the stores hold the client states as a plain list; either store resumes them."""
    _, reference = run(small_run, tmp_path, "FedProto", "memory", "whole")
    assert run(small_run, tmp_path, "FedProto", "memory", "old", "-gr", "1")[0] == 0
    path = tmp_path / "ckpt_old" / "Digits_FedProto_old_0.pt"
    state = torch.load(path, weights_only=True)
    state["clients"] = state["clients"]["states"]
    torch.save(state, path)
    status, resumed = run(small_run, tmp_path, "FedProto", store, "old", "--resume")
    assert status == 0
    for key in CURVES:
        assert np.array_equal(resumed[key], reference[key], equal_nan=True), key


def test_without_checkpoints_the_disk_store_leaves_nothing_behind(small_run, tmp_path):
    argv = small_run("-algo", "FedProto", "-gr", "1", "--client_state", "disk")
    assert experiment.main(argv) == 0
    assert not (tmp_path / "results" / "client_state").exists()


def test_state_files_round_trip_every_kind_of_value_without_pickle(assert_same_state):
    state = {"model": {"w": torch.randn(3, 2), "steps": torch.tensor(7)},
             "optimizer": {"state": {0: {"momentum": torch.ones(2, dtype=torch.float16)}},
                           "param_groups": [{"lr": 0.01, "params": [0, 1], "nesterov": False}]},
             "generator": torch.Generator().manual_seed(3).get_state(), "mask": torch.tensor([True, False]),
             "loss": float("nan"), "best": float("inf"), "version": None, "pair": (1, "a"), "empty": torch.empty(0)}
    tensors = {}
    skeleton = encode(state, tensors, "s")
    restored = decode(skeleton, tensors)
    assert_same_state(restored, state)
    with pytest.raises(TypeError, match="cannot store a object"):
        encode({"x": object()}, {}, "s")


def error_lines(capsys):
    """The error lines main.py printed (progress bars share stderr); no traceback allowed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


class Killed(Exception):
    pass


def test_a_run_killed_mid_round_resumes_from_its_checkpoint(small_run, tmp_path, monkeypatch, failing_from_call):
    """Killed while writing a client's state in round 1 (other clients' files already rewritten), the resumed
    run equals an uninterrupted one: the files of the last checkpoint were kept."""
    _, reference = run(small_run, tmp_path, "FedKD", "disk", "whole")
    real_save = client_store.save_file
    # Writes: construction 4, round 0: 3 selected + 1 reply; the 10th is the second write of round 1.
    monkeypatch.setattr(client_store, "save_file", failing_from_call(real_save, 10, Killed()))
    with pytest.raises(Killed):
        run(small_run, tmp_path, "FedKD", "disk", "split")
    monkeypatch.setattr(client_store, "save_file", real_save)
    status, resumed = run(small_run, tmp_path, "FedKD", "disk", "split", "--resume")
    assert status == 0
    for key in CURVES:
        assert np.array_equal(resumed[key], reference[key], equal_nan=True), key


def test_a_full_disk_stops_in_one_line_and_the_run_resumes(small_run, tmp_path, monkeypatch, capsys):
    _, reference = run(small_run, tmp_path, "FedProto", "disk", "whole")
    real_save = client_store.save_file
    writes = []

    def disk_fills_up(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) > 9:
            with open(path, "wb") as f:
                f.write(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(client_store, "save_file", disk_fills_up)
    capsys.readouterr()
    status, _ = run(small_run, tmp_path, "FedProto", "disk", "split")
    assert status == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0], err
    folder = tmp_path / "ckpt_split" / "client_state" / "Digits_FedProto_split_0"
    assert not glob.glob(str(folder / "*.tmp"))
    monkeypatch.setattr(client_store, "save_file", real_save)
    status, resumed = run(small_run, tmp_path, "FedProto", "disk", "split", "--resume")
    assert status == 0
    for key in CURVES:
        assert np.array_equal(resumed[key], reference[key], equal_nan=True), key


def test_a_state_file_of_another_client_is_refused(small_run, tmp_path, capsys):
    assert run(small_run, tmp_path, "FedProto", "disk", "a", "-gr", "1")[0] == 0
    folder = tmp_path / "ckpt_a" / "client_state" / "Digits_FedProto_a_0"
    files = sorted(glob.glob(str(folder / "*.safetensors")))
    first, second = (f for f in files if "client_00000" in f), (f for f in files if "client_00001" in f)
    shutil.copyfile(next(second), next(first))
    capsys.readouterr()
    assert run(small_run, tmp_path, "FedProto", "disk", "a", "-gr", "2", "--resume")[0] == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "holds the state of another run or client" in err[0]


def test_an_unwritable_state_folder_is_refused_before_anything_is_written(small_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = small_run("-algo", "Local", "-gr", "1", "--client_state", "disk",
                     "--client_state_dir", str(blocker / "states"))
    assert experiment.main(argv) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "is not writable" in err[0] and "--client_state_dir" in err[0]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("available,expected", [(2**50, "memory"), (2**20, "disk")])
def test_auto_picks_the_store_from_the_estimated_size(small_run, tmp_path, monkeypatch, capsys, available,
                                                      expected):
    monkeypatch.setattr("flcore.runner.available_memory_bytes", lambda: available)
    assert experiment.main(small_run("-algo", "Local", "-gr", "1")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("client state:")]
    assert len(lines) == 1 and lines[0].startswith(f"client state: {expected}")


def test_a_waiting_client_holds_no_model_tensors(small_run, digits_root):
    from flcore.runner import Runner
    from flutils.data import load_federated_dataset
    from flutils.options import parse_args

    config = parse_args(small_run("-algo", "Local", "--client_state", "disk"))
    server = Runner(config, load_federated_dataset(config.run), 0, torch.device("cpu"))
    client = server.clients[1]
    assert sum(p.numel() for p in client.model.parameters()) == 0
    with server.store.loaded(client, modify=False):
        sizes = [p.numel() for p in client.model.parameters()]
        assert min(sizes) > 0
    assert sum(p.numel() for p in client.model.parameters()) == 0
    server.store.close()
