"""The runner: one run of an algorithm. It owns what is the same for every algorithm: rounds, client selection,
drops and stragglers, the evaluation schedule, communication accounting, checkpoint and resume, and the history of
results. The algorithm (flcore/servers/) only says what to send and how to aggregate; an engine carries the
clients' turns: `LocalClients` here (one at a time, in this process), `ClientPool` (-pc workers,
flcore/parallel.py) or Flower nodes (system/flower/)."""
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from flcore.algorithms import server_class
from flcore.client_store import (
    AVAILABLE_SHARE,
    STATE_MULTIPLE,
    DiskStore,
    MemoryStore,
    OffloadStore,
    available_memory_bytes,
    state_bytes,
)
from flcore.clients.clientbase import client_setup
from flcore.errors import UserError
from flcore.exchange import Payload, PhaseTimer, TurnRequest, derive_seed, take_turn
from flcore.history import History
from flcore.load_cache import LoadCache
from flcore.servers.serverbase import RunContext

# Why round 0's numbers are what they are: it evaluates before any training.
ROUND_ZERO_NOTE = ("before any training: untrained models (methods that classify by prototypes have none yet, so "
                   "their accuracy can be below chance)")
# Settings that may change between a run and its resumption without changing what the run computes.
RESUME_FREE = {"resume", "times", "prev", "device", "device_id", "results_dir", "save_folder_name",
               "image_every", "num_threads", "parallel_clients", "workers_per_gpu", "offload", "global_rounds",
               "auto_break", "top_cnt", "goal", "dataset_dir", "client_state", "client_state_dir", "logger"}

# Simulated delays (seconds) of slow clients, as the reference sleeps: per batch when training, once when sending.
SLOW_TRAIN_DELAY = 0.1
SLOW_SEND_DELAY = 0.1


def run_name(settings, run):
    """The file stem of run `run`'s results and checkpoint (the reference library's naming)."""
    return f"{settings.dataset}_{settings.algorithm}_{settings.goal}_{run}"


@dataclass(frozen=True)
class ClientPlan:
    """What an engine builds a run's clients from: every engine gets the same, so every engine builds the same
    clients."""
    server_cls: type
    settings: object  # RunSettings
    run: int
    device: torch.device
    image_shape: tuple
    data: dict  # {client id: ClientData}
    slow_train: frozenset
    spec: Payload  # the algorithm's client_spec()
    store_location: tuple  # (folder, run key, keep files for checkpoints) of a disk store
    reference_model: object  # reference_model(client_id): that client's initial model, built apart


def build_clients(plan, client_ids):
    """{client id: client} for `client_ids`, each built from its own seed as `plan.server_cls.new_client` builds it,
    and the store they wait in: memory or disk as --client_state says (auto: disk once the state of all -nc
    clients, extrapolated from those built so far, would not fit the available memory). Used for all of a run's
    clients (LocalClients) and for a worker's share of them (flcore/parallel.py)."""
    settings = plan.settings
    only_own = len(client_ids) < settings.num_clients
    open_disk = lambda: DiskStore(*plan.store_location, owned=set(client_ids) if only_own else None)  # noqa: E731
    store = open_disk() if settings.client_state == "disk" else OffloadStore() if settings.offload else MemoryStore()
    clients, state_sizes = {}, []
    for client_id in client_ids:
        setup = client_setup(settings, plan.data[client_id], client_id, plan.run, plan.device, plan.image_shape,
                             train_slow=client_id in plan.slow_train)
        client = plan.server_cls.new_client(setup, plan.spec)
        state_sizes.append(state_bytes(client))
        clients[client_id] = client
        store.add(client)
        if settings.client_state == "auto" and store.kind == "memory" and not fits_in_memory(state_sizes,
                                                                                            settings.num_clients):
            store = open_disk()
            for built in clients.values():
                store.add(built)
    return clients, store


def estimated_state_bytes(state_sizes, num_clients):
    """Resident memory of `num_clients` clients in memory, extrapolated from the states of those built so far."""
    return STATE_MULTIPLE * sum(state_sizes) * num_clients / len(state_sizes)


def fits_in_memory(state_sizes, num_clients):
    available = available_memory_bytes()
    return available is None or estimated_state_bytes(state_sizes, num_clients) <= AVAILABLE_SHARE * available


def store_choice_line(kind, folder, state_sizes, num_clients):
    """The one line --client_state auto prints: where the client state lives (`kind`, a disk store's `folder`),
    and why."""
    where = "memory" if kind == "memory" else f"disk ({folder})"
    available = available_memory_bytes()
    return (f"client state: {where}; estimated {estimated_state_bytes(state_sizes, num_clients) / 2**30:.1f} GiB "
            f"resident for {num_clients} clients, "
            f"{available / 2**30 if available else float('nan'):.1f} GiB available (--client_state chooses)")


def client_range_text(clients):
    """The end of an evaluation's line: its worst and best client by test accuracy (`clients`: {client id:
    (accuracy, ...)}; those without test data are left out), or nothing when there are none."""
    rated = {client_id: metrics[0] for client_id, metrics in clients.items() if not np.isnan(metrics[0])}
    if not rated:
        return ""
    worst, best = min(rated, key=rated.get), max(rated, key=rated.get)
    return (f"; clients worst {100 * rated[worst]:.1f} % (client {worst}), "
            f"best {100 * rated[best]:.1f} % (client {best})")


def run_client_turns(clients, store, requests, upload_phase, progress=False):
    """The turns of `requests` ({client id: TurnRequest}) on `clients` ({client id: client}), in order, each client
    resident in `store` for its turn; returns {client id: TurnReply}."""
    replies = {}
    turns = tqdm(requests.items(), desc="clients", unit="client", leave=False) if progress else requests.items()
    for client_id, request in turns:
        client = clients[client_id]
        with store.loaded(client, modify=bool(request.payloads) or request.train):
            replies[client_id] = take_turn(client, request, upload_phase)
    return replies


class LocalClients:
    """The engine that runs every client in this process, one at a time, each resident in the store for its turn
    (memory, --offload or disk: flcore/client_store.py). The other engines have the same methods: ClientPool
    (flcore/parallel.py) and FlowerClients (system/flower/)."""

    def __init__(self):
        self.clients, self.store, self.upload_phase = {}, None, "train"

    def start(self, plan):
        self.upload_phase = plan.server_cls.upload_phase
        self.clients, self.store = build_clients(plan, sorted(plan.data))
        if plan.settings.client_state == "auto":
            tqdm.write(store_choice_line(self.store.kind, getattr(self.store, "folder", None),
                                         [state_bytes(client) for client in self.clients.values()],
                                         plan.settings.num_clients))

    def run_turns(self, requests):
        """{client id: TurnReply} of the turns that completed (here: all). A turn touches only its client's own
        state, so the order does not change results."""
        return run_client_turns(self.clients, self.store, requests, self.upload_phase, progress=True)

    def state_dict(self):
        return self.store.checkpoint_state(list(self.clients.values()))

    def load_state_dict(self, state):
        self.store.restore(list(self.clients.values()), state)

    def checkpoint_written(self):
        self.store.checkpoint_written()

    def close(self):
        if self.store is not None:
            self.store.close()


class Runner:
    """One run (-t gives several) of the algorithm `config.run.algorithm` with settings `config`: builds the
    algorithm's server and, through `engine` (default: LocalClients), its clients; `train()` runs the rounds."""

    def __init__(self, config, dataset, run, device, cache=None, engine=None, image_sink=None, observer=None):
        """`image_sink(round, images, captions)`: called with the images an algorithm made in a round (FedKTL's
        generated pairs), to save or log them. `observer` (flcore/history.py: Observer) watches the history as it
        is recorded."""
        self.config = config
        self.settings = settings = config.run
        self.dataset = dataset
        self.run = run
        self.device = device
        self.image_sink = image_sink
        self.closed = False
        self.seed = derive_seed(settings.seed, run)
        self.rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        self.history = History(settings.num_clients, observer)
        self.round = 0
        self.upload_floats = 0
        self.download_floats = 0
        # Replies of `aggregate` not yet delivered: {client id: [payload, ...]}, sent with the client's next turn.
        self.pending = {}
        server_cls = server_class(settings.algorithm)
        context = RunContext(
            run=run, seed=self.seed, device=device, num_clients=settings.num_clients,
            num_classes=settings.num_classes, feature_dim=settings.feature_dim, model_family=settings.model_family,
            image_shape=dataset.image_shape, global_rounds=settings.global_rounds, batch_size=settings.batch_size,
            learning_rate=settings.local_learning_rate,
            class_names=tuple(dataset.config["class_names"]) if dataset.config.get("class_names") else None,
            dataset_folder=dataset.folder, cache=cache if cache is not None else LoadCache(),
            reference_model=self.reference_model)
        self.algorithm = server_cls(config.algo, context)
        self.spec = self.algorithm.client_spec()
        self.slow_train = self.pick_clients(settings.train_slow_rate)
        self.send_slow = self.pick_clients(settings.send_slow_rate)
        self.engine = engine if engine is not None else LocalClients()
        self.start_engine(ClientPlan(
            server_cls=server_cls, settings=settings, run=run, device=device, image_shape=dataset.image_shape,
            data={i: dataset.clients[i] for i in range(settings.num_clients) if i < len(dataset.clients)},
            slow_train=frozenset(self.slow_train), spec=self.spec, store_location=self.store_location(),
            reference_model=self.reference_model))
        torch.manual_seed(self.seed)

    def start_engine(self, plan):
        """Builds the clients through the engine; if that fails (a client its worker cannot build), the engine is
        closed before the error goes on, so no worker outlives the run."""
        try:
            self.engine.start(plan)
        except BaseException:
            self.engine.close()
            raise

    @property
    def phases(self):
        return self.algorithm.phases

    @property
    def clients(self):
        """This process's clients, by id order (an engine that runs them elsewhere has none here)."""
        return list(getattr(self.engine, "clients", {}).values())

    @property
    def store(self):
        return getattr(self.engine, "store", None)

    def reference_model(self, client_id):
        """A copy of client `client_id`'s initial model, built the way its node builds it, without touching the
        run's random streams (for algorithms that check or mirror the clients' architectures)."""
        with torch.random.fork_rng(devices=[]):
            return client_setup(self.settings, None, client_id, self.run, torch.device("cpu"),
                                self.dataset.image_shape).model

    def store_location(self):
        """(folder, run key, keep files for checkpoints) of this run's disk store: a folder under
        --client_state_dir (default: client_state/ beside the checkpoints, else beside the results)."""
        settings = self.settings
        root = settings.client_state_dir or os.path.join(settings.save_folder_name or settings.results_dir,
                                                         "client_state")
        run_key = hashlib.sha256(json.dumps([self.fingerprint(), self.run], sort_keys=True, default=str)
                                 .encode()).hexdigest()[:16]
        return os.path.join(root, run_name(settings, self.run)), run_key, bool(settings.save_folder_name)

    def pick_clients(self, rate):
        return set(self.rng.choice(self.settings.num_clients, int(rate * self.settings.num_clients),
                                   replace=False).tolist())

    def select_clients(self):
        """The ids of this round's clients."""
        settings = self.settings
        count = max(1, int(settings.join_ratio * settings.num_clients))
        if settings.random_join_ratio:
            count = int(self.rng.integers(count, settings.num_clients + 1))
        return [int(i) for i in self.rng.choice(settings.num_clients, count, replace=False)]

    def arrived_uploads(self, trained):
        """The ids of the trained clients ({id: TurnReply}) whose uploads reach the server: drops, then (with -ts)
        the time threshold."""
        settings = self.settings
        arrived = list(trained)
        if settings.client_drop_rate > 0:
            keep = max(1, int((1 - settings.client_drop_rate) * len(arrived)))
            arrived = [arrived[i] for i in sorted(self.rng.choice(len(arrived), keep, replace=False))]
        if settings.time_select:
            kept = []
            for client_id in arrived:
                cost = trained[client_id].train_seconds
                if client_id in self.slow_train:
                    cost += SLOW_TRAIN_DELAY * float(self.rng.random(trained[client_id].batches).sum())
                if client_id in self.send_slow:
                    cost += SLOW_SEND_DELAY * float(self.rng.random())
                if cost <= settings.time_threshold:
                    kept.append(client_id)
            arrived = kept
        return arrived

    def evaluate(self, stats):
        """Records the round's evaluation from each client's (correct, samples, AUC, test loss, last train loss), by
        client id; clients whose turn failed (Flower) are missing from `stats`."""
        if not any(s[1] for s in stats.values()):
            nan = float("nan")
            self.history.record_eval(self.round, nan, nan, nan, nan, nan)
            tqdm.write(f"round {self.round:4d} | no client's evaluation arrived")
            return
        ids = list(stats)
        correct = np.array([stats[i][0] for i in ids], dtype=np.float64)
        counts = np.array([stats[i][1] for i in ids], dtype=np.float64)
        aucs = np.array([stats[i][2] for i in ids], dtype=np.float64)
        has_test = counts > 0
        acc = correct.sum() / counts.sum()
        auc = float(np.sum(aucs[has_test] * counts[has_test]) / counts.sum())
        per_client_acc = correct[has_test] / counts[has_test]
        losses = [s[4] for s in stats.values() if not np.isnan(s[4])]
        train_loss = float(np.mean(losses)) if losses else float("nan")
        # A client without test data has no accuracy (nan), and weighs nothing in the pooled one.
        clients = {i: (s[0] / s[1] if s[1] else float("nan"), s[2], s[3], s[4], s[1]) for i, s in stats.items()}
        self.history.record_eval(self.round, float(acc), auc, float(per_client_acc.std()),
                                 float(aucs[has_test].std()), train_loss, clients)
        if self.round == 0:  # evaluated before any training: there is no train loss to show yet
            tqdm.write(f"round    0 | test acc {acc:.4f} | test auc {auc:.4f} | acc std {per_client_acc.std():.4f}"
                       f"{client_range_text(clients)} | {ROUND_ZERO_NOTE}")
            return
        tqdm.write(f"round {self.round:4d} | test acc {acc:.4f} | test auc {auc:.4f} | "
                   f"acc std {per_client_acc.std():.4f} | train loss {train_loss:.4f}{client_range_text(clients)}")

    def round_requests(self, selected, evaluating, train_in_turn):
        """The turns of one round: the selected clients (sent their payloads, evaluated when `evaluating`, trained
        when `train_in_turn`), then, when evaluating, every other client with the replies waiting for it."""
        requests = {}
        for client_id in selected:
            payloads = self.pending.pop(client_id, [])
            payload = self.algorithm.payload_for(client_id)
            if payload is not None:
                self.download_floats += payload.floats()
                payloads.append(payload)
            requests[client_id] = TurnRequest(self.round, payloads, evaluating, train_in_turn)
        if evaluating:
            for client_id in range(self.settings.num_clients):
                if client_id not in requests:
                    requests[client_id] = TurnRequest(self.round, self.pending.pop(client_id, []), True, False)
        return requests

    def run_turns(self, requests, timer=None):
        """The engine's replies to `requests`; a turn that did not complete (a Flower node gone) makes the
        algorithm forget what it believed that client holds, and the client misses the round."""
        replies = self.engine.run_turns(requests)
        for client_id in requests:
            if client_id not in replies:
                tqdm.write(f"round {self.round}: client {client_id} misses this round")
                self.algorithm.forget(client_id)
        if timer is not None:
            for reply in replies.values():
                timer.add(reply.seconds)
        return replies

    def receive_uploads(self, uploads, timer):
        """Counts the arrived uploads, aggregates them and queues the replies (counted as they are made)."""
        self.upload_floats += sum(upload.floats() for upload in uploads.values())
        for client_id, reply in self.algorithm.aggregate(uploads, timer).items():
            self.download_floats += reply.floats()
            self.pending.setdefault(client_id, []).append(reply)

    def send(self, selected):
        """The round's sending to the clients `selected`, outside the round loop (tools, tests)."""
        self.algorithm.prepare_round([client.id for client in selected])
        self.run_turns(self.round_requests([client.id for client in selected], evaluating=False,
                                           train_in_turn=False))

    def exchange(self, arrived, timer):
        """The uploads of the clients `arrived` (trained already), aggregated, and the replies delivered at once,
        outside the round loop (tools, tests)."""
        uploads = {}
        for client in arrived:
            with self.store.loaded(client):
                uploads[client.id] = client.upload()
        self.receive_uploads(uploads, timer)
        self.run_turns({client.id: TurnRequest(self.round, self.pending.pop(client.id), False, False)
                        for client in arrived if client.id in self.pending})

    def train(self):
        """Run the remaining rounds; returns the history. As in the reference library, round r selects clients
        and sends them the server's knowledge, then evaluates (every -eg rounds) before training, so round 0
        measures the untrained models; one more evaluation follows the last round. The checkpoint after round r
        is the state before round r + 1, so a resumed run, or one extended with a larger -gr, continues exactly
        as an uninterrupted one."""
        settings = self.settings
        rounds = tqdm(range(self.round, settings.global_rounds + 1), desc=f"run {self.run}", unit="round",
                      initial=self.round, total=settings.global_rounds + 1)
        for r in rounds:
            self.round = self.algorithm.round = r
            timer = PhaseTimer(self.phases, self.device)
            start = time.perf_counter()
            self.upload_floats = self.download_floats = 0
            self.algorithm.round_metrics = {}
            self.algorithm.round_images = None
            selected = self.select_clients()
            self.algorithm.prepare_round(selected)
            last = r == settings.global_rounds
            evaluating = r % settings.eval_gap == 0 or last
            # Training may share a client's turn with its evaluation unless the evaluation can end the run.
            train_in_turn = not (last or settings.auto_break)
            replies = self.run_turns(self.round_requests(selected, evaluating, train_in_turn), timer)
            if evaluating:
                self.evaluate({client_id: replies[client_id].stats for client_id in sorted(replies)
                               if replies[client_id].stats})
                if last or (settings.auto_break and self.history.evaluations_since_best() >= settings.top_cnt):
                    break
            if not train_in_turn:
                replies = self.run_turns({client_id: TurnRequest(r, [], False, True) for client_id in selected},
                                         timer)
            trained = {client_id: reply for client_id, reply in replies.items() if reply.upload is not None}
            arrived = self.arrived_uploads(trained)
            self.receive_uploads({client_id: trained[client_id].upload for client_id in arrived}, timer)
            self.history.record_round(r, time.perf_counter() - start, timer.seconds,
                                      self.upload_floats, self.download_floats, self.algorithm.round_metrics)
            if self.algorithm.round_images is not None and self.image_sink is not None:
                self.image_sink(r, *self.algorithm.round_images)
            self.round = r + 1
            self.save_checkpoint()
        best_acc, best_round = self.history.best()
        times = self.history.values["round_time"]
        tqdm.write(f"run {self.run}: best test accuracy {best_acc:.4f} at round {best_round}; "
                   f"{np.mean(times) if times else float('nan'):.2f} s per round")
        self.close()
        return self.history

    def close(self):
        """Ends the engine (its store, its workers); again is a no-op."""
        if not self.closed:
            self.closed = True
            self.engine.close()

    def checkpoint_path(self):
        if not self.settings.save_folder_name:
            return None
        return os.path.join(self.settings.save_folder_name, run_name(self.settings, self.run) + ".pt")

    def fingerprint(self):
        return {k: v for k, v in sorted(self.config.values().items()) if k not in RESUME_FREE}

    def state_dict(self):
        return {
            "fingerprint": self.fingerprint(),
            "round": self.round,
            "history": self.history.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "clients": self.engine.state_dict(),
            "pending": {client_id: [payload.to_dict() for payload in payloads]
                        for client_id, payloads in self.pending.items()},
            "algorithm": self.algorithm.state_dict(),
        }

    def load_state_dict(self, state):
        if state["fingerprint"] != self.fingerprint():
            changed = sorted(k for k in set(state["fingerprint"]) | set(self.fingerprint())
                             if state["fingerprint"].get(k) != self.fingerprint().get(k))
            raise UserError(f"the checkpoint was made with other values of {', '.join(changed)}; "
                            f"rerun with the same flags or drop --resume")
        self.round = state["round"]
        self.history.load_state_dict(state["history"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.engine.load_state_dict(state["clients"])
        self.pending = {client_id: [Payload.from_dict(payload) for payload in payloads]
                        for client_id, payloads in state["pending"].items()}
        self.algorithm.load_state_dict(state["algorithm"])

    def save_checkpoint(self):
        """Written to a temporary file and renamed, so a kill during the write keeps the previous checkpoint."""
        path = self.checkpoint_path()
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        # The stores that keep client states on disk may now drop the files only the previous checkpoint needed.
        self.engine.checkpoint_written()

    def resume(self):
        """Load this run's checkpoint; returns False when there is none (the run starts from round 0)."""
        path = self.checkpoint_path()
        if path is None or not os.path.isfile(path):
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"cannot read checkpoint {path} ({type(exc).__name__}); delete it to start over") from None
        self.load_state_dict(state)
        tqdm.write(f"run {self.run}: resumed from {path} at round {self.round}")
        return True
