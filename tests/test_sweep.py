"""system/sweep.py (flutils/sweep.py): the product of the grids, one main.py process per point, existing points
skipped (a killed sweep resumes), the table, and bad grids as one-line errors that write nothing."""
import csv
import os
import shlex

import numpy as np
import pytest

from flcore.paths import REPO_ROOT
from flutils import sweep
from flutils.options import parse_args
from flutils.results import read_h5

SMALL = os.path.join(REPO_ROOT, "system", "configs", "digits_small.toml")


def sweep_argv(out, digits_root, *grids, extra=()):
    argv = ["--config", SMALL, "--out", str(out), "--late", "2", *extra]
    for grid in grids:
        argv += ["--grid", grid]
    return argv + ["--", "--dataset_dir", str(digits_root), "-gr", "1"]


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_sweep_runs_every_point_writes_the_table_and_resumes(digits_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = sweep_argv(out, digits_root, "algorithm=Local,FedDistill", "seed=3")
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 points, 0 already done, 2 to run" in printed and printed.count("finished") == 2

    rows = read_csv(out / "sweep.csv")
    assert list(rows[0]) == ["algorithm", "seed", "best_acc_mean", "best_acc_std", "late_acc_mean", "late_acc_std",
                             "seconds_per_round", "communication_floats", "command"]
    assert [(row["algorithm"], row["seed"]) for row in rows] == [("Local", "3"), ("FedDistill", "3")]
    for row in rows:
        folder = out / f"algorithm={row['algorithm']}_seed=3"
        data = read_h5(folder / f"Digits_{row['algorithm']}_small_0.h5")
        acc = data["rs_test_acc"]
        assert float(row["best_acc_mean"]) == pytest.approx(np.nanmax(acc) * 100)
        assert float(row["best_acc_std"]) == 0.0, "one run"
        assert float(row["late_acc_mean"]) == pytest.approx(np.mean(acc[-2:]) * 100), "--late 2"
        assert float(row["communication_floats"]) == data["upload_floats"].sum() + data["download_floats"].sum()
        assert float(row["seconds_per_round"]) == pytest.approx(np.mean(data["round_time"]))
        # the row's command reruns exactly that point
        command = shlex.split(row["command"])
        assert command[:2] == ["python", os.path.relpath(os.path.join(REPO_ROOT, "system", "main.py"))]
        config = parse_args(command[2:])
        assert (config.run.algorithm, config.run.seed, config.run.global_rounds, config.run.results_dir) == \
            (row["algorithm"], 3, 1, str(folder))
    assert float(rows[0]["communication_floats"]) == 0 < float(rows[1]["communication_floats"])
    with open(out / "sweep.md") as file:
        table = file.read().splitlines()
    assert len(table) == 4 and table[0].startswith("| algorithm | seed | best acc (%)")
    assert table[3].startswith(f"| FedDistill | 3 | {float(rows[1]['best_acc_mean']):.2f} +- 0.00 |")

    # a sweep killed before its second point ended: that point's summary is missing, so only it runs again
    kept = out / "algorithm=Local_seed=3" / "Digits_Local_small_0.h5"
    kept_before = os.stat(kept).st_mtime_ns
    os.remove(out / "algorithm=FedDistill_seed=3" / "Digits_FedDistill_small.json")
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 points, 1 already done, 1 to run" in printed
    assert printed.count("started") == 1 and "started  algorithm=FedDistill seed=3" in printed
    assert os.stat(kept).st_mtime_ns == kept_before
    assert [row["algorithm"] for row in read_csv(out / "sweep.csv")] == ["Local", "FedDistill"]


def test_points_split_the_cores_and_take_the_product_in_order(digits_root, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    options = sweep.build_parser().parse_args(
        ["--config", SMALL, "--grid", "seed=0,1", "--grid", "batch_size=5,10,20", "--parallel", "3", "--times",
         "2", "--out", str(tmp_path / "out")])
    options.flags = []
    points = sweep.make_points(options)
    assert [(p.config.run.seed, p.config.run.batch_size) for p in points] == \
        [(0, 5), (0, 10), (0, 20), (1, 5), (1, 10), (1, 20)]
    assert all(p.config.run.num_threads == 5 and p.config.run.times == 2 for p in points)
    assert len({p.folder for p in points}) == 6
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("grid,fragment", [
    ("sed=0,1", "unknown key 'sed' in --grid sed=0,1; did you mean --seed?"),
    ("seed=0,one", "key 'seed' in --grid seed=0,one must be an integer, got 'one'"),
    ("auto_break=0,maybe", "key 'auto_break' in --grid auto_break=0,maybe must be a boolean"),
    ("device=cpu,gpu", "must be one of auto, cpu, cuda, got 'gpu'"),
    ("mu=0,10", "key 'mu' in --grid is not a setting of Local"),
    ("seed", "write KEY=V1,V2,..."),
    ("results_dir=a,b", "the sweep sets it"),
    ("local_learning_rate=0.01,-1", "-lr must be > 0"),
])
def test_a_bad_grid_is_a_one_line_error_that_writes_nothing(digits_root, tmp_path, error_line, grid, fragment):
    line = error_line(sweep.main, sweep_argv(tmp_path / "sweep", digits_root, grid))
    assert fragment in line
    assert not (tmp_path / "sweep").exists()


def test_a_grid_key_given_twice_is_refused(digits_root, tmp_path, error_line):
    line = error_line(sweep.main, sweep_argv(tmp_path / "sweep", digits_root, "seed=0", "seed=1"))
    assert "--grid seed is given twice" in line
