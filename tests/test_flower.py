"""FedKTL and the baselines on Flower (system/flower): the same server and client code, turns carried as Flower
messages. Most tests drive the ServerApp's code with a grid in this process (nodes with their own Context, as
Flower gives them), so faults and restarts are exact and fast; one test runs Flower's simulation engine."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import tomllib
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from conftest import processes_mentioning, stop_processes_mentioning
from flcore.errors import UserError
from flcore.paths import REPO_ROOT
from flower_app import client_app
from flower_app.records import engine_settings
from flower_app.server_app import differences_from_main, run_on_flower
from flutils import experiment
from flutils.options import parse_args

CURVES = ("rs_test_acc", "rs_test_auc", "rs_train_loss", "rs_test_acc_std", "upload_floats", "download_floats",
          "rs_client_acc", "rs_client_auc", "rs_client_loss", "rs_client_train_loss", "client_test_samples")
CLIENTS = 4


@pytest.fixture(autouse=True)
def flower_task_identity(monkeypatch):
    """The identity Flower's runtime gives a ServerApp process (messages are stamped with it)."""
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


class LocalGrid:
    """Flower's Grid for ServerApp code, in this process: each node is the ClientApp with a Context of its own
    (node config, state kept between messages). `fail(node, message)` says which turns fail; `restart(node)` gives
    a node a fresh Context, as a restarted SuperNode gets."""

    def __init__(self, run_config, nodes=CLIENTS, node_configs=None, fail=None):
        self.run_config = run_config
        self.node_configs = node_configs or {100 + i: {"partition-id": i, "num-partitions": nodes}
                                             for i in range(nodes)}
        self.contexts = {}
        for node in self.node_configs:
            self.restart(node)
        self.fail = fail or (lambda node, message: False)
        self.sent = []

    def restart(self, node):
        self.contexts[node] = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(),
                                      run_config=self.run_config)

    def get_node_ids(self):
        return list(self.contexts)

    def replace(self, node, new_node):
        """The SuperNode `node` stopped and started again: a new node id, the same node config, a fresh Context."""
        self.node_configs[new_node] = self.node_configs.pop(node)
        del self.contexts[node]
        self.restart(new_node)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's grids do when sending
            node = message.metadata.dst_node_id
            self.sent.append((node, message.metadata.message_type))
            if node not in self.contexts or self.fail(node, message):
                reply = Message(Error(code=0, reason="node went away"), reply_to=message)
            else:
                try:
                    reply = client_app.app(message, self.contexts[node])
                except Exception as exc:  # what Flower turns into an error reply
                    reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            replies.append(reply)
        return replies


def disk_nodes(folder):
    """Node configs of CLIENTS nodes (ids 100, 101, ...) that keep their client's state in `folder`."""
    return {100 + i: {"partition-id": i, "num-partitions": CLIENTS, "state-dir": str(folder)} for i in range(CLIENTS)}


def run_config(digits_root, results, algorithm, **flags):
    config = {"algorithm": algorithm, "dataset": "Digits", "num_classes": 10, "num_clients": CLIENTS,
              "model_family": "HtCPU4", "feature_dim": 64, "global_rounds": 2, "device": "cpu", "goal": "flower",
              "dataset_dir": str(digits_root), "results_dir": str(results), "image_every": 0}
    config.update(flags)
    return config


def in_process(small_argv, results, algorithm, *flags):
    argv = small_argv(results, "-algo", algorithm, "-gr", "2", "-go", "flower", "--image_every", "0", *flags)
    assert experiment.main(argv) == 0
    return read_curves(results, algorithm)


def read_curves(results, algorithm):
    from flutils.results import read_h5
    data = read_h5(os.path.join(results, f"Digits_{algorithm}_flower_0.h5"))
    return {key: np.asarray(data[key]) for key in CURVES}


def assert_same_curves(actual, expected):
    for key in CURVES:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


# An algorithm's own settings at the small -fd 64 (FedMRL's nested dimension must fit in it), by field name.
SMALL_SETTINGS = {"FedMRL": {"sub_feature_dim": 16}}


# FedL2G-logit differs from FedL2G-feat only in the guided output's width; -pc covers both variants.
@pytest.mark.parametrize("algorithm", ["FedKTL-stylegan-3", "FedProto", "FedKD", "FedL2G-feat", "FedMRL"])
def test_flower_turns_give_the_in_process_results_bit_for_bit(digits_root, small_argv, tmp_path, algorithm,
                                                              one_torch_thread):
    settings = SMALL_SETTINGS.get(algorithm, {})
    flags = [text for name, value in settings.items() for text in (f"--{name}", str(value))]
    expected = in_process(small_argv, tmp_path / "main", algorithm, *flags)
    grid = LocalGrid(run_config(digits_root, tmp_path / "flower", algorithm, **settings))
    run_on_flower(grid, grid.run_config)
    assert_same_curves(read_curves(tmp_path / "flower", algorithm), expected)
    assert {kind for _, kind in grid.sent} == {"query", "train", "evaluate"}
    saved = parse_args(["--config", str(tmp_path / "flower" / f"Digits_{algorithm}_flower.toml")])
    assert saved == engine_settings(grid.run_config)[0], "a Flower run saves its resolved configuration too"


def test_a_failing_node_drops_its_client_from_the_round_and_gets_the_whole_mentee_after(digits_root, tmp_path,
                                                                                         one_torch_thread):
    def fail(node, message):  # client 1's turn of round 1
        turn = message.content["turn"] if "turn" in message.content else None
        return turn is not None and int(turn["client"]) == 1 and int(turn["round"]) == 1

    healthy = LocalGrid(run_config(digits_root, tmp_path / "healthy", "FedKD", global_rounds=3))
    run_on_flower(healthy, healthy.run_config)
    faulty = LocalGrid(run_config(digits_root, tmp_path / "faulty", "FedKD", global_rounds=3,
                                  **{"rejoin-wait": 0.5}), fail=fail)
    run_on_flower(faulty, faulty.run_config)
    ok, bad = read_curves(tmp_path / "healthy", "FedKD"), read_curves(tmp_path / "faulty", "FedKD")
    assert np.array_equal(ok["upload_floats"][:1], bad["upload_floats"][:1])
    assert bad["upload_floats"][1] < ok["upload_floats"][1], "client 1's upload is missing in round 1"
    # Round 2: the server forgot client 1's mentee version, so it sends the whole mentee (156810 floats), not the
    # compressed update the others get.
    assert bad["download_floats"][2] > ok["download_floats"][2] + 100_000
    assert np.all(np.isfinite(bad["rs_test_acc"]))


def test_a_restarted_node_continues_from_its_state_on_disk(digits_root, tmp_path, one_torch_thread):
    config = run_config(digits_root, tmp_path / "plain", "FedProto", global_rounds=3)
    plain = LocalGrid(config)
    run_on_flower(plain, config)

    config = run_config(digits_root, tmp_path / "restarted", "FedProto", global_rounds=3)
    node_configs = disk_nodes(tmp_path / "nodes")
    restarted = LocalGrid(config, node_configs=node_configs)

    def restart_node_2_once(node, message):
        if node == 102 and "turn" in message.content and int(message.content["turn"]["round"]) == 2:
            if not getattr(restart_node_2_once, "done", False):
                restarted.restart(node)  # its memory is gone; its folder is not
                restart_node_2_once.done = True
        return False

    restarted.fail = restart_node_2_once
    run_on_flower(restarted, config)
    assert restart_node_2_once.done
    assert_same_curves(read_curves(tmp_path / "restarted", "FedProto"), read_curves(tmp_path / "plain", "FedProto"))
    kept = sorted(os.listdir(tmp_path / "nodes" / "run_0_client_00002"))
    assert len([f for f in kept if f.startswith("client_")]) == 3, kept


def test_a_supernode_restarted_under_a_new_node_id_reruns_the_lost_turn_exactly(digits_root, tmp_path,
                                                                               one_torch_thread):
    healthy = LocalGrid(run_config(digits_root, tmp_path / "healthy", "FedProto", global_rounds=3))
    run_on_flower(healthy, healthy.run_config)

    config = run_config(digits_root, tmp_path / "rejoined", "FedProto", global_rounds=3)
    node_configs = disk_nodes(tmp_path / "nodes")
    grid = LocalGrid(config, node_configs=node_configs)

    def stop_node_1_in_round_1(node, message):
        if node == 101 and "turn" in message.content and int(message.content["turn"]["round"]) == 1:
            grid.replace(101, 201)  # this turn is lost; the node comes back under a new id
            return True
        return False

    grid.fail = stop_node_1_in_round_1
    run_on_flower(grid, config)
    # The turn lost with node 101 ran again on node 201, from the state on disk: nothing changed.
    assert_same_curves(read_curves(tmp_path / "rejoined", "FedProto"), read_curves(tmp_path / "healthy", "FedProto"))
    assert (101, "train") in grid.sent and (201, "train") in grid.sent


def test_a_resumed_server_app_continues_as_an_uninterrupted_run(digits_root, tmp_path, one_torch_thread):
    node_configs = disk_nodes(tmp_path / "nodes")
    whole = run_config(digits_root, tmp_path / "whole", "FedKTL-stylegan-3", global_rounds=3)
    run_on_flower(LocalGrid(whole), whole)

    split = run_config(digits_root, tmp_path / "split", "FedKTL-stylegan-3", global_rounds=1,
                       save_folder_name=str(tmp_path / "checkpoints"))
    nodes = LocalGrid(split, node_configs=node_configs)
    run_on_flower(nodes, split)
    resumed = dict(split, global_rounds=3, resume=True)
    nodes = LocalGrid(resumed, node_configs=node_configs)  # a new ServerApp and restarted nodes: only disks remain
    run_on_flower(nodes, resumed)
    assert_same_curves(read_curves(tmp_path / "split", "FedKTL-stylegan-3"),
                       read_curves(tmp_path / "whole", "FedKTL-stylegan-3"))


class ServerAppCrash(Exception):
    pass


def test_a_server_app_killed_mid_round_resumes_with_nodes_ahead_of_its_checkpoint(digits_root, tmp_path,
                                                                                   one_torch_thread):
    whole = run_config(digits_root, tmp_path / "whole", "FedKTL-stylegan-3", global_rounds=3)
    run_on_flower(LocalGrid(whole), whole)

    config = run_config(digits_root, tmp_path / "crashed", "FedKTL-stylegan-3", global_rounds=3,
                        save_folder_name=str(tmp_path / "checkpoints"))
    grid = LocalGrid(config, node_configs=disk_nodes(tmp_path / "nodes"))
    turns_in_round_2 = []

    def crash_after_two_turns_of_round_2(node, message):
        if "turn" in message.content and int(message.content["turn"]["round"]) == 2:
            if len(turns_in_round_2) == 2:  # nodes 0 and 1 have saved their round-2 state; the server has not
                raise ServerAppCrash
            turns_in_round_2.append(node)
        return False

    grid.fail = crash_after_two_turns_of_round_2
    with pytest.raises(ServerAppCrash):
        run_on_flower(grid, config)
    resumed = dict(config, resume=True)
    run_on_flower(LocalGrid(resumed, node_configs=disk_nodes(tmp_path / "nodes")), resumed)
    assert_same_curves(read_curves(tmp_path / "crashed", "FedKTL-stylegan-3"),
                       read_curves(tmp_path / "whole", "FedKTL-stylegan-3"))


@pytest.mark.parametrize("change,fragment", [
    ({"node_configs": {100: {"num-partitions": 4}}}, "has no partition-id; start it with --node-config"),
    ({"node_configs": {100 + i: {"partition-id": i + 1} for i in range(4)}}, "partition-id 4 is out of range"),
    ({"config": {"algorithm": "Nope"}}, "unknown algorithm 'Nope'"),
    ({"config": {"no_such_flag": 1}}, "unknown flag 'no_such_flag' in the run config"),
    ({"config": {"node-wait": 0.5}, "nodes": 3}, "only 3 of 4 nodes connected"),
])
def test_bad_flower_input_is_one_clear_error_and_writes_nothing(digits_root, tmp_path, change, fragment):
    config = {**run_config(digits_root, tmp_path / "results", "FedProto"), **change.get("config", {})}
    grid = LocalGrid(config, nodes=change.get("nodes", CLIENTS))
    if "node_configs" in change:
        grid.node_configs.update(change["node_configs"])
        for node in change["node_configs"]:
            grid.restart(node)
    with pytest.raises(UserError, match=fragment):
        run_on_flower(grid, config)
    assert not os.path.exists(tmp_path / "results")


def test_the_app_says_where_its_defaults_differ_from_main():
    """The app's run config (system/flower/pyproject.toml) is sized for a quick check; the ServerApp names every
    setting that main.py without flags would set otherwise."""
    with open(os.path.join(REPO_ROOT, "system", "flower", "pyproject.toml"), "rb") as f:
        app_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    config, _ = engine_settings(app_config)
    changed = differences_from_main(config)
    for expected in ("global_rounds 2 (main.py: 10)", "feature_dim 64 (main.py: 512)", "device 'cpu' (main.py: 'auto')",
                     "num_threads 1 (main.py: 0)", "goal 'flower' (main.py: 'test')", "image_every 0 (main.py: 1)"):
        assert expected in changed
    assert len(changed) == 6, changed
    assert differences_from_main(parse_args([])) == []


@pytest.fixture
def own_flower_home(tmp_path, monkeypatch):
    """A Flower home of this test's own (FLWR_HOME); the local SuperLink and SuperExec that `flwr run` starts there
    and leaves running are stopped after the test."""
    home = tmp_path / "flwr_home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    yield home
    stop_processes_mentioning(str(home))


@pytest.mark.skipif(shutil.which("flwr") is None, reason="flwr is installed by requirements.txt")
def test_flwr_run_simulation_engine_matches_main(digits_root, small_argv, tmp_path, own_flower_home):
    """`flwr run system/flower` with 4 virtual SuperNodes in Flower's simulation engine: FedProto's curves equal
    main.py's; Flower wrote only into its home under tmp_path, and nothing of it is left running."""
    expected = in_process(small_argv, tmp_path / "main", "FedProto")
    overrides = " ".join(f"{k}={v!r}".replace("'", '"') for k, v in {
        "algorithm": "FedProto", "dataset_dir": str(digits_root), "results_dir": str(tmp_path / "flower")}.items())
    user_home = os.path.expanduser("~/.flwr")
    user_home_before = os.path.exists(user_home) and os.stat(user_home).st_mtime_ns
    try:
        done = subprocess.run(["flwr", "run", os.path.join(REPO_ROOT, "system", "flower"), "local", "--stream",
                               "--federation-config", f"num-supernodes={CLIENTS}", "--run-config", overrides],
                              capture_output=True, text=True, timeout=900)
    finally:
        started = stop_processes_mentioning(str(own_flower_home))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_curves(read_curves(tmp_path / "flower", "FedProto"), expected)
    assert started, "flwr run's local SuperLink names its Flower home on its command line (how it is found)"
    assert processes_mentioning(str(own_flower_home)) == []
    assert (os.path.exists(user_home) and os.stat(user_home).st_mtime_ns) == user_home_before, "~/.flwr was written"
    assert os.path.isdir(own_flower_home)
