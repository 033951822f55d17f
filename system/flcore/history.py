"""A run's results in memory: one entry per evaluation and one per trained round; the runner records them,
the harness (flutils/results.py) writes them, and an observer (flutils/tracking.py: TensorBoard, W&B) may watch
them as they come."""
import math

import numpy as np

EVAL_KEYS = ("rs_test_acc", "rs_test_auc", "rs_test_acc_std", "rs_test_auc_std", "rs_train_loss", "eval_rounds")
# Per evaluation, one value per client (nan for a client not evaluated): accuracy, AUC and loss on its test split,
# and its last training loss.
CLIENT_KEYS = ("rs_client_acc", "rs_client_auc", "rs_client_loss", "rs_client_train_loss")
ROUND_KEYS = ("round_time", "upload_floats", "download_floats")


class Observer:
    """What watches a run's history as it is recorded (flutils/tracking.py); each method does nothing here."""

    def evaluation(self, round_index, values):
        """`values`: the evaluation's entry of each EVAL_KEYS and CLIENT_KEYS series (a list per client for the
        latter)."""

    def round(self, round_index, values):
        """`values`: the trained round's costs and the algorithm's metrics by name, phase times as time_<phase>."""


class History:
    """Evaluation metrics (one entry per evaluation, per-client ones a row of `num_clients`), the clients' test
    samples, and per-round costs (one entry per trained round); each record is passed on to `observer`."""

    def __init__(self, num_clients, observer=None):
        self.num_clients = num_clients
        self.observer = observer if observer is not None else Observer()
        self.values = {key: [] for key in EVAL_KEYS + CLIENT_KEYS + ROUND_KEYS}
        self.phase_times = {}
        self.client_samples = [0] * num_clients  # each client's test samples, as its evaluations report them

    def record_eval(self, round_index, acc, auc, acc_std, auc_std, train_loss, clients=None):
        """`clients`: {client id: (accuracy, AUC, test loss, train loss, test samples)} of the clients evaluated."""
        clients = clients or {}
        rows = [[float("nan")] * self.num_clients for _ in CLIENT_KEYS]
        for client_id, (*metrics, samples) in clients.items():
            for row, value in zip(rows, metrics):
                row[client_id] = float(value)
            self.client_samples[client_id] = int(samples)
        for key, value in zip(EVAL_KEYS + CLIENT_KEYS, (acc, auc, acc_std, auc_std, train_loss, round_index, *rows)):
            self.values[key].append(value)
        self.observer.evaluation(round_index, {key: self.values[key][-1] for key in EVAL_KEYS + CLIENT_KEYS})

    def record_round(self, round_index, seconds, phases, upload, download, metrics):
        """`metrics`: algorithm-specific per-round values (e.g. FedKTL's alignment losses), stored by name."""
        for name, value in metrics.items():
            self.values.setdefault(name, []).append(value)
        self.values["round_time"].append(seconds)
        self.values["upload_floats"].append(upload)
        self.values["download_floats"].append(download)
        for name, value in phases.items():
            self.phase_times.setdefault(name, []).append(value)
        self.observer.round(round_index, {"round_time": seconds, "upload_floats": upload, "download_floats": download,
                                          **{f"time_{name}": value for name, value in phases.items()}, **metrics})

    @property
    def accuracies(self):
        return self.values["rs_test_acc"]

    def best(self):
        """(best accuracy, round it was reached) over the evaluations so far."""
        acc = self.accuracies
        if not acc:
            return float("nan"), -1
        i = self.best_index()
        return acc[i], self.values["eval_rounds"][i]

    def best_index(self):
        """The evaluation with the best accuracy (the first one while all are nan: no evaluation arrived)."""
        acc = self.accuracies
        return int(np.nanargmax(acc)) if not all(math.isnan(a) for a in acc) else 0

    def evaluations_since_best(self):
        return len(self.accuracies) - 1 - self.best_index() if self.accuracies else 0

    def state_dict(self):
        return {"values": {k: list(v) for k, v in self.values.items()},
                "phase_times": {k: list(v) for k, v in self.phase_times.items()},
                "client_samples": list(self.client_samples)}

    def load_state_dict(self, state):
        """Checkpoints from before the per-client series load with nan rows for their evaluations."""
        self.values = {k: list(v) for k, v in state["values"].items()}
        evaluations = len(self.values["eval_rounds"])
        for key in CLIENT_KEYS:
            self.values.setdefault(key, [[float("nan")] * self.num_clients for _ in range(evaluations)])
        self.phase_times = {k: list(v) for k, v in state["phase_times"].items()}
        self.client_samples = list(state.get("client_samples", [0] * self.num_clients))
