"""Per-client metrics (History, the .h5, the evaluation line) and --logger: TensorBoard event files and W&B offline
runs read back against the .h5, the missing-package error."""
import glob
import json
import math
import os
import struct
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from flcore.history import CLIENT_KEYS, History
from flcore.runner import Runner
from flutils import experiment
from flutils.options import parse_args

NUM_CLIENTS = 4  # small_run's -nc
WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log of 32 KiB blocks after a 7-byte header


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, every file it writes (its run folder, cache, settings, logs) under tmp_path."""
    pytest.importorskip("wandb")
    for name, folder in (("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "wandb_cache"),
                         ("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_DATA_DIR", "wandb_data")):
        os.makedirs(tmp_path / folder)
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "wandb_dir"


def child_processes():
    """{pid: command line} of this process's children."""
    children = {}
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_path) as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(stat_path[:-len("stat")] + "cmdline", "rb") as f:
                command = f.read()
        except OSError:  # gone meanwhile
            continue
        if parent == os.getpid():
            children[int(stat_path.split("/")[2])] = command
    return children


def wandb_history(path):
    """The rows the run logged (wandb.log), read from its offline .wandb file."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B"
    records, chunks, pos = [], [], 7
    while pos + 7 <= len(raw):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunks.append(raw[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(b"".join(chunks))
            chunks = []
    rows = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def event_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return events


def test_per_client_arrays_pool_back_to_the_run_and_tensorboard_holds_the_h5_values(small_run, results_dir,
                                                                                      results_of):
    argv = small_run("-algo", "Local", "-gr", "2", "--num_threads", "1", "--logger", "tensorboard")
    assert experiment.main(argv) == 0
    assert experiment.main(argv) == 0  # a run that starts over replaces its event file
    data = results_of(argv)
    evaluations = len(data["eval_rounds"])
    for key in CLIENT_KEYS:
        assert data[key].shape == (evaluations, NUM_CLIENTS), key
    samples = data["client_test_samples"]
    assert samples.shape == (NUM_CLIENTS,) and np.all(samples > 0)
    acc, auc = data["rs_client_acc"], data["rs_client_auc"]
    np.testing.assert_allclose((acc * samples).sum(1) / samples.sum(), data["rs_test_acc"], rtol=1e-12)
    np.testing.assert_allclose((auc * samples).sum(1) / samples.sum(), data["rs_test_auc"], rtol=1e-12)
    np.testing.assert_allclose(acc.std(1), data["rs_test_acc_std"], rtol=1e-12)
    # The test loss is measured at every evaluation; the training loss only exists once a client has trained.
    assert np.all(np.isfinite(data["rs_client_loss"]) & (data["rs_client_loss"] > 0))
    assert np.all(np.isnan(data["rs_client_train_loss"][0]))
    np.testing.assert_allclose(data["rs_client_train_loss"][1:].mean(1), data["rs_train_loss"][1:], rtol=1e-12)
    assert data["rs_client_loss"][-1].mean() < data["rs_client_loss"][0].mean(), "training lowers the test loss"

    folder = os.path.join(results_dir(argv), "tensorboard", "Digits_Local_test_0")
    assert len(glob.glob(os.path.join(folder, "events.out.tfevents.*"))) == 1
    events = event_scalars(folder)
    logged = events.Scalars("rs_test_acc")
    assert [e.step for e in logged] == data["eval_rounds"].tolist()
    assert [e.value for e in logged] == data["rs_test_acc"].astype(np.float32).tolist()
    assert [e.value for e in events.Scalars("rs_client_acc/min")] == acc.min(1).astype(np.float32).tolist()
    assert [e.value for e in events.Scalars("rs_client_acc/max")] == acc.max(1).astype(np.float32).tolist()
    assert [e.step for e in events.Scalars("round_time")] == [0, 1]
    assert [e.value for e in events.Scalars("time_train")] == data["time_train"].astype(np.float32).tolist()


def test_fedktl_sends_its_round_metrics_and_image_grid_to_tensorboard(small_run, results_dir, results_of):
    argv = small_run("-algo", "FedKTL-stylegan-3", "-se", "2", "-sbs", "8", "-gen", "untrained", "-gr", "1",
                     "--num_threads", "1", "--logger", "tensorboard")
    assert experiment.main(argv) == 0
    data = results_of(argv)
    events = event_scalars(os.path.join(results_dir(argv), "tensorboard", "Digits_FedKTL-stylegan-3_test_0"))
    for key in ("align_mmd", "align_centroid", "image_distance", "image_std", "upload_floats", "time_align"):
        assert [e.value for e in events.Scalars(key)] == data[key].astype(np.float32).tolist(), key
    grids = events.Images("generated_images")
    assert [grid.step for grid in grids] == [0] and grids[0].width > 0
    assert os.path.isfile(os.path.join(results_dir(argv), "Digits_FedKTL-stylegan-3_test_0_images",
                                       "round_0000.png"))


def test_wandb_offline_run_logs_the_h5_values_and_leaves_no_process(small_run, results_of, wandb_offline):
    before = set(child_processes())
    argv = small_run("-algo", "Local", "-gr", "1", "--num_threads", "1", "--logger", "wandb")
    assert experiment.main(argv) == 0
    assert not {pid: cmd for pid, cmd in child_processes().items() if pid not in before and b"wandb" in cmd}
    runs = glob.glob(str(wandb_offline / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    rows = wandb_history(runs[0])
    data = results_of(argv)
    assert [row["_step"] for row in rows] == data["eval_rounds"].tolist()
    assert [row["rs_test_acc"] for row in rows] == data["rs_test_acc"].tolist()
    assert [row["rs_client_acc/max"] for row in rows] == data["rs_client_acc"].max(1).tolist()
    assert rows[0]["round_time"] == data["round_time"][0] and "round_time" not in rows[1]  # no round after the last


def test_logger_wandb_without_the_package_is_one_line_and_writes_nothing(small_run, results_dir, capsys,
                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    argv = small_run("-algo", "Local", "-gr", "1", "--logger", "wandb")
    assert experiment.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --logger wandb") and "pip install wandb" in err and "\n" not in err
    assert not os.path.exists(results_dir(argv))


def test_a_wandb_run_that_cannot_start_is_one_line(small_run, capsys, monkeypatch, wandb_offline):
    import wandb

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setattr(wandb, "init", no_key)
    assert experiment.main(small_run("-algo", "Local", "-gr", "1", "--logger", "wandb")) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --logger wandb could not start a run (No API key configured. Use `wandb login` to log in.); run "
        "`wandb login`, or set WANDB_MODE=offline to log without a network")


def test_evaluation_line_names_the_worst_and_best_client(make_server, capsys):
    server = make_server("Local")
    server.round = 1  # round 0's line says why it is what it is instead (test_newcomer)
    # (correct, samples, AUC, test loss, train loss) by client; client 2 has no test data, client 3's turn failed.
    server.evaluate({0: (3, 10, 0.7, 1.5, 2.0), 1: (18, 20, 0.9, 0.5, 1.0), 2: (0, 0, math.nan, math.nan, 3.0)})
    out = capsys.readouterr().out
    assert out.strip().endswith("; clients worst 30.0 % (client 0), best 90.0 % (client 1)")
    values = server.history.values
    assert values["rs_test_acc"][-1] == pytest.approx(21 / 30)
    np.testing.assert_array_equal(values["rs_client_acc"][-1], [0.3, 0.9, math.nan, math.nan])
    np.testing.assert_array_equal(values["rs_client_loss"][-1], [1.5, 0.5, math.nan, math.nan])
    np.testing.assert_array_equal(values["rs_client_train_loss"][-1], [2.0, 1.0, 3.0, math.nan])
    assert server.history.client_samples == [10, 20, 0, 0]


def test_history_from_a_checkpoint_without_per_client_series_loads_with_nan_rows():
    old = History(3)
    old.record_eval(0, 0.5, 0.8, 0.1, 0.1, math.nan)
    state = old.state_dict()
    for key in CLIENT_KEYS:
        del state["values"][key]
    del state["client_samples"]
    history = History(3)
    history.load_state_dict(state)
    assert all(np.isnan(history.values[key]).all() and np.shape(history.values[key]) == (1, 3)
               for key in CLIENT_KEYS)
    assert history.client_samples == [0, 0, 0] and history.accuracies == [0.5]


def test_the_logger_does_not_change_the_checkpoint_fingerprint(small_run):
    fingerprints = [Runner.fingerprint(SimpleNamespace(config=parse_args(small_run("--logger", logger))))
                    for logger in ("none", "tensorboard", "wandb")]
    assert fingerprints[0] == fingerprints[1] == fingerprints[2]
