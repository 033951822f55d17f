"""A run's history (flcore/history.py) written once at the end as .h5 (reference names), plus summaries and plots."""
import json
import os

import h5py
import numpy as np

from flutils.visualize import save_figure


def experiment_name(args):
    return f"{args.dataset}_{args.algorithm}_{args.goal}"


def write_h5(history, path, attrs):
    """Atomic: a reader never sees a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        for key, series in history.values.items():
            f.create_dataset(key, data=np.asarray(series, dtype=np.float64))
        for name, series in history.phase_times.items():
            f.create_dataset(f"time_{name}", data=np.asarray(series, dtype=np.float64))
        f.create_dataset("client_test_samples", data=np.asarray(history.client_samples, dtype=np.int64))
        best_acc, best_round = history.best()
        f.attrs["best_acc"] = best_acc
        f.attrs["best_round"] = best_round
        for key, value in attrs.items():
            f.attrs[key] = value
    os.replace(tmp, path)


def read_h5(path):
    with h5py.File(path, "r") as f:
        data = {key: np.asarray(f[key]) for key in f.keys()}
        data["attrs"] = dict(f.attrs)
    return data


def summarize(histories):
    """Mean and std over runs of each run's best accuracy, and the mean seconds per round."""
    best = np.array([h.best()[0] for h in histories], dtype=np.float64)
    round_times = [t for h in histories for t in h.values["round_time"]]
    return {
        "runs": len(histories),
        "best_acc_mean": float(np.mean(best)),
        "best_acc_std": float(np.std(best)),
        "best_acc_per_run": best.tolist(),
        "seconds_per_round": float(np.mean(round_times)) if round_times else float("nan"),
    }


def write_summary(path, summary):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, path)


def client_range(rows):
    """(min, max) over the clients of each evaluation's per-client values (`rows`: evaluations x clients), nan
    where no client has a value."""
    if not len(rows):
        return np.empty(0), np.empty(0)
    values = np.asarray(rows, dtype=np.float64)
    present = ~np.isnan(values)
    low = np.where(present, values, np.inf).min(axis=1, initial=np.inf)
    high = np.where(present, values, -np.inf).max(axis=1, initial=-np.inf)
    empty = ~present.any(axis=1)
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


def plot_accuracy(path, histories, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run, history in enumerate(histories):
        rounds = history.values["eval_rounds"]
        line, = ax.plot(rounds, np.asarray(history.accuracies) * 100, marker=".", label=f"run {run}")
        low, high = client_range(history.values["rs_client_acc"])
        ax.fill_between(rounds, low * 100, high * 100, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%), band: clients' min to max")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
