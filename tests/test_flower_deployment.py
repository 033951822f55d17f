"""Flower's deployment mode on this machine: a SuperLink and three SuperNodes as separate processes
(system/flower/deploy_local.py), one FedKTL round, the same curves as main.py, and nothing left running."""
import importlib.util
import os
import shutil

import numpy as np
import pytest
import tomllib

from flcore.errors import UserError
from flcore.paths import REPO_ROOT
from flower_app.records import engine_settings
from flutils import experiment
from flutils.results import read_h5

pytestmark = pytest.mark.skipif(shutil.which("flower-superlink") is None,
                                reason="Flower is installed by requirements.txt")
CURVES = ("rs_test_acc", "rs_test_auc", "rs_train_loss", "upload_floats", "download_floats")


def load_deploy_local():
    spec = importlib.util.spec_from_file_location("deploy_local",
                                                  os.path.join(REPO_ROOT, "system", "flower", "deploy_local.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def running_flower_processes(folder):
    """Processes whose command line names `folder` (this deployment's SuperNodes, SuperLink, apps)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if str(folder).encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_superlink_and_three_supernodes_run_fedktl_like_main_and_stop_cleanly(tmp_path, one_torch_thread):
    deploy_local = load_deploy_local()
    out = tmp_path / "deploy"
    assert deploy_local.main(["--nodes", "3", "--rounds", "1", "--out", str(out)]) == 0
    assert running_flower_processes(out) == []
    flower = read_h5(str(out / "results" / "Digits_FedKTL-stylegan-3_deploy_0.h5"))

    # main.py with the flags the app ran with: the app's run config (system/flower/pyproject.toml) and the
    # script's overrides.
    with open(os.path.join(REPO_ROOT, "system", "flower", "pyproject.toml"), "rb") as f:
        app_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    args, _ = engine_settings({**app_config, "algorithm": "FedKTL-stylegan-3", "num_clients": 3, "global_rounds": 1,
                               "goal": "deploy", "dataset_dir": str(out / "datasets"),
                               "results_dir": str(tmp_path / "main")})
    experiment.run_experiment(args)
    expected = read_h5(str(tmp_path / "main" / "Digits_FedKTL-stylegan-3_deploy_0.h5"))
    for key in CURVES:
        np.testing.assert_array_equal(flower[key], expected[key], err_msg=key)
    assert len(os.listdir(out / "node_state")) == 3, "each SuperNode kept its client's state on its disk"


def test_an_unreachable_superlink_is_one_clear_error(tmp_path):
    deploy_local = load_deploy_local()
    with pytest.raises(UserError, match=r"the SuperLink on 127.0.0.1:\d+ did not answer within 1 s; see "):
        deploy_local.wait_healthy(deploy_local.free_port(), 1, str(tmp_path / "superlink.log"))


def test_deploy_local_refuses_fewer_than_two_nodes(error_line, tmp_path):
    deploy_local = load_deploy_local()
    assert error_line(deploy_local.main, ["--nodes", "1", "--out", str(tmp_path)]) == (
        "error: --nodes must be >= 2, got 1")
