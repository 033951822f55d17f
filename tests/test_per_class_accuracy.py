"""benchmarks/per_class_accuracy.py: it scores a run's last checkpoint as the run did, bins the test samples by the
client's training count of their class, and applies the post-hoc logit adjustment."""
import json
import os
import subprocess
import sys

from flcore.paths import REPO_ROOT
from flutils import experiment

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "per_class_accuracy.py")


def analyse(*arguments):
    return subprocess.run([sys.executable, SCRIPT, *map(str, arguments)], capture_output=True, text=True,
                          timeout=300)


def test_scores_the_checkpoint_as_the_run_did_and_the_prior_removes_unseen_predictions(small_run, tmp_path):
    argv = small_run("-algo", "FedKTL-stylegan-3", "-se", "5", "-sbs", "8", "--image_every", "0", "-gr", "1",
                     "-go", "pc", "-sfn", str(tmp_path / "checkpoints"))
    assert experiment.main(argv) == 0
    toml = tmp_path / "results" / "Digits_FedKTL-stylegan-3_pc.toml"
    done = analyse(toml, "--tau", "0", "1000", "--out", tmp_path / "pc.json")
    assert done.returncode == 0, done.stderr
    numbers = json.loads((tmp_path / "pc.json").read_text())
    plain, prior = numbers["by_tau"]["0.0"], numbers["by_tau"]["1000.0"]
    assert numbers["recorded_accuracy"] == plain["correct"] / plain["samples"]
    assert sum(n for _, n in plain["bins"]) == plain["samples"] and sum(c for c, _ in plain["bins"]) == plain["correct"]
    # A prior a thousand times its log weight: nothing is predicted outside the client's training classes, so test
    # samples of classes it never saw are all wrong.
    assert prior["unseen_predictions"] == 0 and prior["bins"][0][0] == 0
    assert "| 1000 |" in done.stdout


def test_a_run_without_checkpoints_is_a_one_line_error(small_run, tmp_path):
    assert experiment.main(small_run("-algo", "Local", "-gr", "1", "-go", "nock")) == 0
    done = analyse(tmp_path / "results" / "Digits_Local_nock.toml")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: no checkpoint for run 0") and "-sfn DIR" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = analyse(tmp_path / "missing.toml")
    assert done.returncode == 2 and "does not exist" in done.stderr
