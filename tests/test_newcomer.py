"""What a newcomer meets on a fresh clone: thread waiting on shared cores, errors whose suggested fix works, one-line
usage errors, the results table's rounds and curves, the image grid's captions, round 0's line, the default
device, and a stopped run's resume hint."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from flcore.errors import UserError
from flcore.history import History
from flcore.paths import REPO_ROOT
from flcore.runner import ROUND_ZERO_NOTE
from fldata.cli import run as run_generation
from fldata.errors import DatasetError
from fldata.sources import DIGIT_NAMES, DatasetSpec
from flutils import experiment, results_table
from flutils.data import load_federated_dataset
from flutils.options import build_parser, parse_args
from flutils.results import write_h5

MAIN = os.path.join(REPO_ROOT, "system", "main.py")


def env_report_plugin(folder):
    """A module for --import that prints OMP_WAIT_POLICY as main.py left it and ends the process."""
    (folder / "report_wait_policy.py").write_text(
        "import os, sys\nprint('OMP_WAIT_POLICY=' + os.environ.get('OMP_WAIT_POLICY', '<unset>'))\nsys.exit(0)\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_main_lets_waiting_threads_sleep_unless_the_user_chose(tmp_path, given, expected):
    env = env_report_plugin(tmp_path)
    env.pop("OMP_WAIT_POLICY", None)
    if given:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, MAIN, "--import", "report_wait_policy"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"OMP_WAIT_POLICY={expected}"


def test_help_says_how_threads_behave_on_a_busy_machine_and_what_algo_is():
    text = " ".join(build_parser().format_help().split())
    assert "OMP_WAIT_POLICY=PASSIVE" in text and "on shared cores 1 is often fastest" in text
    assert re.search(r"-algo ALGORITHM, --algorithm ALGORITHM the algorithm to run: FedKTL-stylegan-xl", text)


def test_a_bad_choice_is_one_line_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--kt_norm", "kep"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("main.py: error: argument --kt_norm: invalid choice: 'kep'")
    assert all(f"'{choice}'" in lines[0] for choice in ("update", "keep", "aux"))


def dataset_error(dataset_dir, *flags):
    with pytest.raises(UserError) as error:
        load_federated_dataset(parse_args(["--dataset_dir", str(dataset_dir), *flags]).run)
    return str(error.value)


def assert_suggested_scripts_exist(message):
    for script in re.findall(r"python (dataset/\S+\.py)", message):
        assert os.path.isfile(os.path.join(REPO_ROOT, script)), f"{message} names {script}"


def test_a_users_own_dataset_is_not_sent_to_a_script_that_does_not_exist(tmp_path):
    (tmp_path / "MyDigits").mkdir()
    (tmp_path / "MyDigits" / "config.json").write_text("{broken")
    message = dataset_error(tmp_path, "-data", "MyDigits")
    assert "python dataset/generate_MyDigits.py" not in message
    assert "there is no dataset/generate_MyDigits.py" in message and "dataset/README.md" in message


def test_a_missing_dataset_of_unknown_name_lists_the_ones_the_scripts_make(tmp_path):
    message = dataset_error(tmp_path, "-data", "MyDigits")
    assert "check -data and --dataset_dir" in message and "Cifar10, Cifar100, Digits" in message
    assert "generate_MyDigits" not in message


def test_an_empty_config_names_what_it_lacks_not_none(tmp_path):
    (tmp_path / "Digits").mkdir()
    (tmp_path / "Digits" / "config.json").write_text("{}")
    message = dataset_error(tmp_path)
    assert "None" not in message and "has no integer num_classes and num_clients" in message
    assert "python dataset/generate_Digits.py --num-clients 4" in message
    assert_suggested_scripts_exist(message)


def test_a_missing_download_only_dataset_suggests_the_command_that_fetches_it(tmp_path):
    message = dataset_error(tmp_path, "-data", "Cifar10")
    assert message.endswith("python dataset/generate_Cifar10.py --num-clients 4 --download")
    assert_suggested_scripts_exist(message)


def failing_download(spec, root, download):
    with open(os.path.join(root, "partial.bin"), "wb") as f:
        f.write(b"half")
    raise DatasetError("downloading Fake failed (no network)")


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_failed_download_leaves_no_rawdata_behind(tmp_path, capsys, out_exists):
    spec = DatasetSpec("Fake", 10, (1, 28, 28), "fake layout", failing_download)
    out = tmp_path / "Fake"
    if out_exists:
        out.mkdir()
    assert run_generation(spec, ["--download", "--out", str(out)]) == 2
    assert "downloading Fake failed" in capsys.readouterr().err
    assert not (out / "rawdata").exists()
    assert out.exists() == out_exists, "a folder the user had stays, one the download made goes"


def fake_run(path, rounds, accuracy):
    history = History(1)
    for r in range(rounds + 1):
        history.record_eval(r, accuracy * r / rounds, 0.5, 0.0, 0.0, float("nan") if r == 0 else 1.0)
        if r < rounds:
            history.record_round(r, 1.0, {}, 10.0, 20.0, {})
    write_h5(history, str(path), {"args": "{}", "run": 0, "seed": 0})


def test_results_table_has_a_rounds_column_and_plots_the_curves(tmp_path, capsys):
    fake_run(tmp_path / "Digits_Local_mix_0.h5", 10, 0.9)
    fake_run(tmp_path / "Digits_FedProto_mix_0.h5", 3, 0.6)
    fake_run(tmp_path / "Digits_FedProto_mix_1.h5", 10, 0.8)
    plot = tmp_path / "plots" / "curves.png"
    assert results_table.main(["--goal", "mix", "--results_dir", str(tmp_path), "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in lines[0].split("|")]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")] for line in lines[2:4]}
    column = header.index("rounds")
    assert rows["Local"][column] == "10" and rows["FedProto"][column] == "3 / 10"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and lines[-1] == f"curves: {plot}"
    x, y = results_table.mean_curve([results_table.read_h5(str(tmp_path / f"Digits_FedProto_mix_{i}.h5"))
                                     for i in range(2)])
    assert list(x) == [0, 1, 2, 3], "the rounds both runs have"
    np.testing.assert_allclose(y, [0, (20 + 8) / 2, (40 + 16) / 2, (60 + 24) / 2])
    assert results_table.main(["--goal", "mix", "--results_dir", str(tmp_path), "--rounds", "2"]) == 0
    assert "| 2 |" in capsys.readouterr().out.splitlines()[2]
    assert results_table.main(["--goal", "mix", "--results_dir", str(tmp_path), "--plot", "x.pdf"]) == 2


def test_round_zero_says_why_it_is_what_it_is_and_prints_no_nan(small_run, capsys):
    assert experiment.main(small_run("-algo", "FedProto", "-gr", "1")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("round")]
    first = [line for line in lines if line.startswith("round    0 |")]
    assert len(first) == 1 and first[0].endswith(ROUND_ZERO_NOTE) and "below chance" in first[0]
    assert not any("nan" in line for line in lines), lines
    assert any(line.startswith("round    1 |") and "train loss" in line for line in lines)


def test_fedktl_round_zero_measurements_and_captioned_titled_image_grid(small_run, capsys, monkeypatch):
    grids = []
    monkeypatch.setattr(experiment, "save_image_grid",
                        lambda path, images, captions, title="": grids.append((len(images), captions, title)))
    argv = small_run("-algo", "FedKTL-stylegan-3", "-gen", "untrained", "-gr", "1", "-se", "2")
    assert experiment.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("round")]
    assert any(line.startswith("round 0: alignment MMD") for line in lines)
    assert not any("nan" in line for line in lines), lines
    config = json.load(open(os.path.join(argv[argv.index("--dataset_dir") + 1], "Digits", "config.json")))
    assert config["class_names"] == list(DIGIT_NAMES)
    assert grids == [(10, list(DIGIT_NAMES), "FedKTL-stylegan-3, run 0: round 0 of 1")]


def test_the_image_grid_is_written_with_a_title(tmp_path):
    path = tmp_path / "grid.png"
    from flutils.visualize import save_image_grid
    save_image_grid(str(path), torch.zeros(3, 1, 8, 8), ["a", "b", "c"], title="round 4 of 9")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_device_is_auto(capsys):
    run = parse_args([]).run
    assert run.device == "auto"
    device = experiment.resolve_device(run)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert capsys.readouterr().out == "", "auto chooses without a notice"


def test_a_terminated_run_prints_the_exact_command_that_resumes_it(small_run, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    argv = small_run("-algo", "Local", "-gr", "200", "-sfn", str(checkpoints), "--num_threads", "1")
    run = subprocess.Popen([sys.executable, MAIN, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*.pt")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, stderr
    last = stderr.strip().splitlines()[-1]
    prefix = "stopped; continue from the last checkpoint with: python "
    assert last.startswith(prefix), stderr
    command = shlex.split(last[len(prefix):])
    assert os.path.abspath(command[0]) == MAIN and command[1:] == argv + ["--resume"]
    assert parse_args(command[1:]).run.resume


def test_a_stop_before_any_checkpoint_says_how_to_have_one(small_run):
    config = parse_args(small_run("-algo", "Local"))
    assert "-sfn DIR" in experiment.resume_hint(config, [])
