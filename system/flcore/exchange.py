"""The one exchange contract between a server and its clients, whichever engine carries it: this process
(flcore/servers/serverbase.py) or Flower (system/flower/). A client takes turns: it receives the server's payloads,
is evaluated, trains, and uploads one payload; the server builds what it sends from its own state only and
aggregates the uploads that arrived. Upload and download sizes are counted from the payloads themselves."""
import time
from dataclasses import dataclass, field

import numpy as np
import torch


def derive_seed(*keys):
    """Independent 63-bit seeds for (base seed, run), (base seed, run, client) and (client seed, round)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


@dataclass
class Payload:
    """What travels one way between server and client.

    tensors: named tensors; the floating-point ones are what the README's per-round float counts count (integer
        and bool tensors are class ids and masks: indexing, not knowledge).
    config: settings and small values (numbers, strings, booleans), not counted.
    metrics: measurements a client reports for the server's round metrics (numbers or lists of numbers), not
        counted."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, bool | int | float | str] = field(default_factory=dict)
    metrics: dict[str, float | list[float]] = field(default_factory=dict)

    def floats(self):
        return sum(t.numel() for t in self.tensors.values() if t.is_floating_point())

    def to_dict(self):
        return {"tensors": self.tensors, "config": self.config, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, state):
        return cls(dict(state["tensors"]), dict(state["config"]), dict(state["metrics"]))


def flatten(tree, prefix):
    """{name: {part: tensor}} -> {"prefix/name/part": tensor}, for nested tensors in a payload."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}/{key}"))
        else:
            flat[f"{prefix}/{key}"] = value
    return flat


def unflatten(tensors, prefix):
    """The inverse of `flatten` for the keys under `prefix` (None when there are none)."""
    tree = {}
    for key, value in tensors.items():
        if not key.startswith(prefix + "/"):
            continue
        *path, last = key[len(prefix) + 1:].split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return tree or None


@dataclass
class TurnRequest:
    """One client's turn in a round: the payloads to receive (in order), then whether to evaluate and to train."""
    round: int
    payloads: list[Payload]
    evaluate: bool
    train: bool


@dataclass
class TurnReply:
    """stats: (correct, test samples, AUC, last training loss) when evaluated; upload: after training;
    seconds: per phase of the turn; train_seconds: of training alone; batches: training steps taken (for the simulated delays of slow clients)."""
    stats: tuple | None = None
    upload: Payload | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    batches: int = 0


def timed(seconds, name, device, work):
    """work(), adding its wall-clock time to seconds[name] (CUDA work finished before reading the clock)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = work()
    sync()
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return result


def take_turn(client, request, upload_phase="train"):
    """Runs one turn on `client` (a flcore client, resident); the same function for every engine. Training draws
    the global random stream (dropout) from a seed of its own client and round, so a client trains the same
    whichever clients trained before it, in this process or another."""
    reply = TurnReply()
    for payload in request.payloads:
        client.receive(payload)
    if request.evaluate:
        reply.stats = (*timed(reply.seconds, "eval", client.device, client.test_metrics), client.last_train_loss)
    if request.train:
        devices = []
        if client.device.type == "cuda":
            devices = [client.device.index if client.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(client.seed, request.round))
            training = {}
            timed(training, "train", client.device, client.train)
        reply.train_seconds = training["train"]
        reply.seconds["train"] = reply.seconds.get("train", 0.0) + reply.train_seconds
        reply.batches = client.batches_last_round
        reply.upload = timed(reply.seconds, upload_phase, client.device, client.upload)
    return reply
