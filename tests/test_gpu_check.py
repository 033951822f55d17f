"""benchmarks/gpu_check.sh on the CPU, at its dry-run sizes: a configuration is measured in its own process and
recorded in the JSON and the markdown table; one that runs past the time budget is stopped or skipped, and the
report is complete either way. (The whole dry run takes minutes: docs/gpu.md.)"""
import json
import os
import subprocess

from flcore.paths import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "gpu_check.sh")


def test_the_dry_run_measures_records_and_keeps_to_its_budget(tmp_path):
    out = tmp_path / "out"
    # No CIFAR-10 subset there: the dry run falls back to scikit-learn's digits. --compile runs last and gets at most
    # what the budget leaves after Local, far less than it needs on the CPU.
    command = [SCRIPT, "--dry-run", "--out", str(out), "--data", str(tmp_path / "missing"), "--budget", "40",
               "--only", "fedktl_compile", "local"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["finished"] and report["wall_s"] < 60
    assert {"device", "gpu_count", "torch", "cuda"} <= set(report["environment"])
    assert report["setup"]["dataset"] == "Digits" and report["setup"]["clients"] == 4
    assert list(report["configs"]) == ["local", "fedktl_compile"]  # in the check's order, not the command's
    local = report["configs"]["local"]
    assert local["status"] == "ok" and local["complete"] is True, local
    assert len(local["round_seconds"]) == 2 and local["seconds_per_round"] == local["round_seconds"][1] > 0
    assert local["peak_allocated_mib"] is None and local["peak_rss_mib"] > 0  # no GPU here
    assert 0 <= local["final_test_acc"] <= 1 and "-algo" in local["argv"]
    compiled = report["configs"]["fedktl_compile"]
    assert compiled["status"] in ("timeout", "skipped") and compiled["error"], compiled
    assert compiled["flags"] == ["--compile", "1"]
    table = (out / "gpu_check.md").read_text()
    assert f"| local | ok | {local['seconds_per_round']:.2f} |" in table
    assert f"| fedktl_compile | {compiled['status']}: " in table
    assert (out / "logs" / "local.log").is_file()
