"""Experiment files (main.py --config, flutils/config_file.py): the same run as the flags, the saved resolved
configuration reruns it, the paper's files resolve, and every bad file is a one-line error that writes nothing."""
import glob
import math
import os
import tomllib

import numpy as np
import pytest

from flcore.paths import REPO_ROOT
from flutils import experiment
from flutils.config_file import config_text, read_config
from flutils.options import parse_args, settings_classes

CONFIGS = os.path.join(REPO_ROOT, "system", "configs")
SMALL = os.path.join(CONFIGS, "digits_small.toml")
# what a run computes (not how long it took)
CURVES = ("rs_test_acc", "rs_test_auc", "rs_test_acc_std", "rs_train_loss", "eval_rounds", "upload_floats",
          "download_floats")


def curves(data):
    return {key: data[key] for key in CURVES}


def assert_same_curves(actual, expected):
    for key in CURVES:
        assert actual[key].dtype == expected[key].dtype and np.array_equal(actual[key], expected[key],
                                                                           equal_nan=True), key


def small_config_argv(digits_root, results, *extra):
    return ["--config", SMALL, "--dataset_dir", str(digits_root), "--results_dir", str(results), *extra]


def test_a_config_run_equals_its_flags_and_its_saved_config_reruns_it(digits_root, tmp_path, results_of):
    """digits_small.toml with -gr 1 on the command line; the same settings as flags; then the saved file alone."""
    from_file = small_config_argv(digits_root, tmp_path / "file", "-gr", "1", "-algo", "FedDistill")
    from_flags = ["-data", "Digits", "-nb", "10", "-nc", "4", "-m", "HtCPU4", "-fd", "64", "-algo", "FedDistill",
                  "-gr", "1", "-dev", "cpu", "--num_threads", "1", "--image_every", "0", "-go", "small",
                  "--dataset_dir", str(digits_root), "--results_dir", str(tmp_path / "flags")]
    assert parse_args(from_file).run.global_rounds == 1, "a flag overrides the file's global_rounds = 2"
    assert experiment.main(from_file) == 0
    assert experiment.main(from_flags) == 0
    first = results_of(from_file)
    assert first["upload_floats"].sum() > 0, "FedDistill communicates, so the comparison covers it"
    assert_same_curves(results_of(from_flags), first)

    saved = tmp_path / "file" / "Digits_FedDistill_small.toml"
    assert parse_args(["--config", str(saved)]) == parse_args(from_file), "the saved file is the whole config"
    assert experiment.main(["--config", str(saved)]) == 0
    assert_same_curves(results_of(from_file), first)


def test_flags_override_the_file_and_the_file_overrides_defaults():
    config = parse_args(["--config", SMALL, "-lr", "0.05"])
    assert config.run.local_learning_rate == 0.05
    assert config.run.global_rounds == 2 and config.run.model_family == "HtCPU4" and config.run.goal == "small"
    assert parse_args([]).run.global_rounds == 10


def test_the_saved_text_reads_back_exactly(tmp_path):
    """Strings with quotes, backslashes, newlines and non-ASCII, floats in exponent form and infinity, booleans;
    a setting left at None (derived by its algorithm) is left out and reads back as None."""
    config = parse_args(["-algo", "FedKTL-stable-diffusion", "-prompt", 'a "cat"\\ on a mat\n\tcafé ☕',
                         "-lr", "1e-05", "-tth", "inf", "-ab", "1", "-dev", "cpu"])
    path = tmp_path / "saved.toml"
    path.write_text(config_text(config, "test"), encoding="utf-8")
    assert parse_args(["--config", str(path)]) == config
    with open(path, "rb") as file:
        assert tomllib.load(file)["time_threshold"] == math.inf
    tgp = parse_args(["-algo", "FedTGP"])
    assert tgp.algo.server_learning_rate is None
    path.write_text(config_text(tgp, "test"), encoding="utf-8")
    assert "server_learning_rate" not in read_config(str(path), settings_classes())
    assert parse_args(["--config", str(path)]) == tgp


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.toml"))))
def test_every_config_in_system_configs_resolves_and_run_me_runs_it(name):
    config = parse_args(["--config", os.path.join(CONFIGS, name)])
    with open(os.path.join(REPO_ROOT, "system", "run_me.sh")) as file:
        run_me = file.read()
    if name != "digits_small.toml":  # the paper's: Cifar100, 20 clients, 1000 rounds, 3 runs
        assert (config.run.dataset, config.run.num_clients, config.run.global_rounds, config.run.times) == \
            ("Cifar100", 20, 1000, 3)
        assert f"configs/{name}" in run_me


def test_the_paper_files_keep_run_me_settings():
    """The values the old run_me.sh passed as flags, for the default row (StyleGAN-XL) and one ablation."""
    xl = parse_args(["--config", os.path.join(CONFIGS, "fedktl_stylegan_xl.toml"), "-m", "HtM10"])
    assert (xl.run.algorithm, xl.run.model_family, xl.algo.lamda, xl.algo.mu, xl.algo.server_learning_rate,
            xl.algo.server_batch_size, xl.algo.server_epochs, xl.algo.gen_batch_size) == \
        ("FedKTL-stylegan-xl", "HtM10", 1.0, 50.0, 0.01, 100, 100, 4)
    sd = parse_args(["--config", os.path.join(CONFIGS, "fedktl_stable_diffusion.toml")])
    assert (sd.algo.lamda, sd.algo.mu, sd.algo.server_learning_rate, sd.algo.stable_diffusion_prompt) == \
        (0.01, 100.0, 0.1, "a cat")


@pytest.mark.parametrize("text,fragments", [
    ("global_round = 2\n", ["unknown key 'global_round'", "did you mean --global_rounds?"]),
    ("lamdba = 1.0\n", ["unknown key 'lamdba'", "did you mean --lamda?"]),
    ('global_rounds = "two"\n', ["key 'global_rounds'", "must be an integer", "'two'"]),
    ("global_rounds = 2.5\n", ["key 'global_rounds'", "must be an integer"]),
    ("local_learning_rate = true\n", ["key 'local_learning_rate'", "must be a number"]),
    ("auto_break = 1\n", ["key 'auto_break'", "must be a boolean"]),
    ("device_id = 0\n", ["key 'device_id'", "must be a string"]),
    ('device = "gpu"\n', ["key 'device'", "must be one of auto, cpu, cuda"]),
    ("mu = 10.0\n", ["key 'mu'", "not a setting of Local", "FedKTL-stylegan-xl"]),
    ("global_rounds = \n", ["not a readable TOML file"]),
])
def test_a_bad_file_is_a_one_line_error_that_writes_nothing(digits_root, tmp_path, error_line, text, fragments):
    path = tmp_path / "bad.toml"
    path.write_text('algorithm = "Local"\n' + text)
    line = error_line(experiment.main, small_config_argv(digits_root, tmp_path / "results") + ["--config", str(path)])
    assert str(path) in line
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "results").exists()


def test_a_missing_file_is_named(tmp_path, error_line):
    line = error_line(experiment.main, ["--config", str(tmp_path / "nope.toml"), "--results_dir",
                                        str(tmp_path / "results")])
    assert "nope.toml: no such file" in line and not (tmp_path / "results").exists()
