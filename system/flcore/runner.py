"""The federated round loop shared by every algorithm, with clients simulated in one process."""
import hashlib
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from flcore.client_store import (
    AVAILABLE_SHARE,
    STATE_MULTIPLE,
    DiskStore,
    MemoryStore,
    OffloadStore,
    available_memory_bytes,
    state_bytes,
)
from flcore.clients.clientbase import Client, client_setup
from flcore.exchange import Payload, PhaseTimer, TurnRequest, derive_seed, take_turn
from flcore.load_cache import LoadCache
from flcore.errors import UserError
from flutils.results import History, run_name

# Flags that may change between a run and its resumption without changing what the run computes.
RESUME_FREE_FLAGS = {"resume", "times", "prev", "device", "device_id", "results_dir", "save_folder_name",
                     "image_every", "num_threads", "parallel_clients", "offload", "global_rounds", "auto_break",
                     "top_cnt", "goal", "dataset_dir", "client_state", "client_state_dir"}

# Simulated delays (seconds) of slow clients, as the reference sleeps: per batch when training, once when sending.
SLOW_TRAIN_DELAY = 0.1
SLOW_SEND_DELAY = 0.1


def build_clients(server_cls, args, run, device, image_shape, data, slow_train, spec, store_location):
    """{client id: client} for the partitions `data` ({client id: ClientData}), each built from its own seed as
    `server_cls.new_client` builds it, and the store they wait in: memory or disk as --client_state says (auto:
    disk once the state of all -nc clients, extrapolated from those built so far, would not fit the available
    memory). Used for all of a run's clients (Server) and for a worker's share of them (flcore/parallel.py)."""
    only_own = len(data) < args.num_clients
    open_disk = lambda: DiskStore(*store_location, owned=set(data) if only_own else None)  # noqa: E731
    store = open_disk() if args.client_state == "disk" else OffloadStore() if args.offload else MemoryStore()
    clients, state_sizes = {}, []
    for client_id, client_data in data.items():
        setup = client_setup(args, client_data, client_id, run, device, image_shape,
                             train_slow=client_id in slow_train)
        client = server_cls.new_client(setup, spec)
        state_sizes.append(state_bytes(client))
        clients[client_id] = client
        store.add(client)
        if args.client_state == "auto" and store.kind == "memory" and not fits_in_memory(state_sizes,
                                                                                        args.num_clients):
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


class Server:
    """One run of an algorithm. A subclass says how its clients are built (`client_spec`, `new_client`), what the
    server sends a selected client (`payload_for`), what it does with the uploads that arrived (`aggregate`, whose
    replies reach each client at its next turn), which state it checkpoints, and which flags it owns (`add_flags`,
    `check_flags`: read by flutils/options.py, so `main.py -h` lists them in the algorithm's group). The server
    never touches a client: everything travels as payloads (flcore/exchange.py), so the clients may live in this
    process (`run_turns` here; their state in memory or on disk, flcore/client_store.py) or on Flower nodes
    (system/flower/)."""
    phases = ("eval", "train")
    # The phase that times a client's upload (FedKTL: "prototypes").
    upload_phase = "train"

    def __init__(self, args, dataset, run, device, cache=None, remote=None):
        """`remote`: clients that live elsewhere (Flower nodes, system/flower/), an object with run_turns(requests)
        ({client id: TurnRequest} -> {client id: TurnReply} of the turns that completed), state_dict() and
        load_state_dict(); None: the clients are built and run in this process (`run_turns`)."""
        self.args = args
        self.dataset = dataset
        self.run = run
        self.device = device
        # Slow-to-load, read-only things (a Stable Diffusion pipeline) shared by the runs of one experiment.
        self.cache = cache if cache is not None else LoadCache()
        self.num_clients = args.num_clients
        self.num_classes = args.num_classes
        self.seed = derive_seed(args.seed, run)
        self.rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        self.history = History()
        self.round = 0
        self.upload_floats = 0
        self.download_floats = 0
        self.round_metrics = {}
        # Replies of `aggregate` not yet delivered: {client id: [payload, ...]}, sent with the client's next turn.
        self.pending = {}
        self.prepare()
        self.spec = self.client_spec()

        self.slow_train = self.pick_clients(args.train_slow_rate)
        self.send_slow = self.pick_clients(args.send_slow_rate)
        self.remote = remote
        self.clients, self.store = [], None
        if remote is None:
            self.build_clients()

    def build_clients(self):
        """This process's clients, one per partition, in memory or on disk as --client_state says."""
        clients, self.store = build_clients(type(self), self.args, self.run, self.device, self.dataset.image_shape,
                                            dict(enumerate(self.dataset.clients[:self.num_clients])),
                                            self.slow_train, self.spec, self.store_location())
        self.clients = list(clients.values())
        torch.manual_seed(self.seed)
        if self.args.client_state == "auto":
            tqdm.write(store_choice_line(self.store.kind, getattr(self.store, "folder", None),
                                         [state_bytes(client) for client in self.clients], self.num_clients))

    def store_location(self):
        """(folder, run key, keep files for checkpoints) of this run's disk store: a folder under
        --client_state_dir (default: client_state/ beside the checkpoints, else beside the results)."""
        args = self.args
        root = args.client_state_dir or os.path.join(args.save_folder_name or args.results_dir, "client_state")
        run_key = hashlib.sha256(json.dumps([self.fingerprint(), self.run], sort_keys=True, default=str)
                                 .encode()).hexdigest()[:16]
        return os.path.join(root, run_name(args, self.run)), run_key, bool(args.save_folder_name)

    @classmethod
    def add_flags(cls, parser):
        """Declares the flags this class owns (not its parents'), in argument groups of `parser`."""

    @classmethod
    def check_flags(cls, args):
        """Raises UserError for a bad value of a flag this class owns (not its parents'); runs at parse time."""

    def prepare(self):
        """Algorithm-specific set-up that the clients depend on; runs before they are built."""

    def client_spec(self):
        """What every client of this run is built from besides its ClientSetup (shared initial weights, settings
        the server resolved): a Payload, so a Flower node builds the same client as this process. Not counted."""
        return Payload()

    @classmethod
    def new_client(cls, setup, spec):
        """The client of this algorithm built from `setup` and the server's `client_spec()`; raises UserError when
        the client's model cannot take part (the message names the client and the fix)."""
        return Client(setup)

    def reference_model(self, client_id):
        """A copy of client `client_id`'s initial model, built the way its node builds it, without touching the
        run's random streams (for servers that check or mirror the clients' architectures)."""
        with torch.random.fork_rng(devices=[]):
            return client_setup(self.args, None, client_id, self.run, torch.device("cpu"),
                                self.dataset.image_shape).model

    def pick_clients(self, rate):
        return set(self.rng.choice(self.num_clients, int(rate * self.num_clients), replace=False).tolist())

    def select_clients(self):
        """The ids of this round's clients."""
        count = max(1, int(self.args.join_ratio * self.num_clients))
        if self.args.random_join_ratio:
            count = int(self.rng.integers(count, self.num_clients + 1))
        return [int(i) for i in self.rng.choice(self.num_clients, count, replace=False)]

    def arrived_uploads(self, trained):
        """The ids of the trained clients ({id: TurnReply}) whose uploads reach the server: drops, then (with -ts)
        the time threshold."""
        arrived = list(trained)
        if self.args.client_drop_rate > 0:
            keep = max(1, int((1 - self.args.client_drop_rate) * len(arrived)))
            arrived = [arrived[i] for i in sorted(self.rng.choice(len(arrived), keep, replace=False))]
        if self.args.time_select:
            kept = []
            for client_id in arrived:
                cost = trained[client_id].train_seconds
                if client_id in self.slow_train:
                    cost += SLOW_TRAIN_DELAY * float(self.rng.random(trained[client_id].batches).sum())
                if client_id in self.send_slow:
                    cost += SLOW_SEND_DELAY * float(self.rng.random())
                if cost <= self.args.time_threshold:
                    kept.append(client_id)
            arrived = kept
        return arrived

    def evaluate(self, stats):
        """Records the round's evaluation from each client's (correct, samples, AUC, last train loss); clients whose
        turn failed (Flower) are missing from `stats`."""
        if not any(s[1] for s in stats):
            nan = float("nan")
            self.history.record_eval(self.round, nan, nan, nan, nan, nan)
            tqdm.write(f"round {self.round:4d} | no client's evaluation arrived")
            return
        correct = np.array([s[0] for s in stats], dtype=np.float64)
        counts = np.array([s[1] for s in stats], dtype=np.float64)
        aucs = np.array([s[2] for s in stats], dtype=np.float64)
        has_test = counts > 0
        acc = correct.sum() / counts.sum()
        auc = float(np.sum(aucs[has_test] * counts[has_test]) / counts.sum())
        per_client_acc = correct[has_test] / counts[has_test]
        losses = [s[3] for s in stats if not np.isnan(s[3])]
        train_loss = float(np.mean(losses)) if losses else float("nan")
        self.history.record_eval(self.round, float(acc), auc, float(per_client_acc.std()),
                                 float(aucs[has_test].std()), train_loss)
        tqdm.write(f"round {self.round:4d} | test acc {acc:.4f} | test auc {auc:.4f} | "
                   f"acc std {per_client_acc.std():.4f} | train loss {train_loss:.4f}")

    def prepare_round(self, selected):
        """What the server computes once per round, from the selected ids, before sending."""

    def payload_for(self, client_id):
        """What the server sends a selected client before its evaluation and training (None: nothing; `Local`)."""
        return None

    def aggregate(self, uploads, timer):
        """What the server does with the uploads that arrived ({client id: Payload}, in arrival order); returns
        the replies to send ({client id: Payload}; delivered with each client's next turn, counted now)."""
        return {}

    def forget(self, client_id):
        """A client's turn failed (a Flower node down): whatever the server believed it holds may be lost, so the
        next payload to it must not build on it."""

    def round_requests(self, selected, evaluating, train_in_turn):
        """The turns of one round: the selected clients (sent their payloads, evaluated when `evaluating`, trained
        when `train_in_turn`), then, when evaluating, every other client with the replies waiting for it."""
        requests = {}
        for client_id in selected:
            payloads = self.pending.pop(client_id, [])
            payload = self.payload_for(client_id)
            if payload is not None:
                self.download_floats += payload.floats()
                payloads.append(payload)
            requests[client_id] = TurnRequest(self.round, payloads, evaluating, train_in_turn)
        if evaluating:
            for client_id in range(self.num_clients):
                if client_id not in requests:
                    requests[client_id] = TurnRequest(self.round, self.pending.pop(client_id, []), True, False)
        return requests

    def run_turns(self, requests):
        """The turns of `requests` ({client id: TurnRequest}) in order, one client resident at a time; returns
        {client id: TurnReply}. A turn touches only its client's own state, so the order does not change results;
        Flower's engine runs them on the nodes instead (system/flower/), -pc in worker processes
        (flcore/parallel.py)."""
        return run_client_turns(dict(enumerate(self.clients)), self.store, requests, self.upload_phase,
                                progress=True)

    def receive_uploads(self, uploads, timer):
        """Counts the arrived uploads, aggregates them and queues the replies (counted as they are made)."""
        self.upload_floats += sum(upload.floats() for upload in uploads.values())
        for client_id, reply in self.aggregate(uploads, timer).items():
            self.download_floats += reply.floats()
            self.pending.setdefault(client_id, []).append(reply)

    def send(self, selected):
        """The round's sending to the clients `selected`, outside the round loop (tools, tests)."""
        self.prepare_round([client.id for client in selected])
        requests = self.round_requests([client.id for client in selected], evaluating=False, train_in_turn=False)
        self.run_turns(requests)

    def exchange(self, arrived, timer):
        """The uploads of the clients `arrived` (trained already), aggregated, and the replies delivered at once,
        outside the round loop (tools, tests)."""
        uploads = {}
        for client in arrived:
            with self.store.loaded(client):
                uploads[client.id] = client.upload()
        self.receive_uploads(uploads, timer)
        waiting = {client.id: TurnRequest(self.round, self.pending.pop(client.id), False, False)
                   for client in arrived if client.id in self.pending}
        self.run_turns(waiting)

    def train(self):
        """Run the remaining rounds; returns the history. As in the reference library, round r selects clients
        and sends them the server's knowledge, then evaluates (every -eg rounds) before training, so round 0
        measures the untrained models; one more evaluation follows the last round. The checkpoint after round r
        is the state before round r + 1, so a resumed run, or one extended with a larger -gr, continues exactly
        as an uninterrupted one."""
        rounds = tqdm(range(self.round, self.args.global_rounds + 1), desc=f"run {self.run}", unit="round",
                      initial=self.round, total=self.args.global_rounds + 1)
        for r in rounds:
            self.round = r
            timer = PhaseTimer(self.phases, self.device)
            start = time.perf_counter()
            self.upload_floats = self.download_floats = 0
            self.round_metrics = {}
            selected = self.select_clients()
            self.prepare_round(selected)
            last = r == self.args.global_rounds
            evaluating = r % self.args.eval_gap == 0 or last
            # Training may share a client's turn with its evaluation unless the evaluation can end the run.
            train_in_turn = not (last or self.args.auto_break)
            run_turns = self.run_turns if self.remote is None else self.remote.run_turns

            def turns(requests):
                replies = run_turns(requests)
                for reply in replies.values():
                    timer.add(reply.seconds)
                return replies

            replies = turns(self.round_requests(selected, evaluating, train_in_turn))
            if evaluating:
                self.evaluate([replies[client_id].stats for client_id in sorted(replies) if replies[client_id].stats])
                if last or (self.args.auto_break and self.history.evaluations_since_best() >= self.args.top_cnt):
                    break
            if not train_in_turn:
                replies = turns({client_id: TurnRequest(r, [], False, True) for client_id in selected})
            trained = {client_id: reply for client_id, reply in replies.items() if reply.upload is not None}
            arrived = self.arrived_uploads(trained)
            self.receive_uploads({client_id: trained[client_id].upload for client_id in arrived}, timer)
            self.history.record_round(time.perf_counter() - start, timer.seconds,
                                      self.upload_floats, self.download_floats, self.round_metrics)
            self.round = r + 1
            self.save_checkpoint()
        best_acc, best_round = self.history.best()
        times = self.history.values["round_time"]
        tqdm.write(f"run {self.run}: best test accuracy {best_acc:.4f} at round {best_round}; "
                   f"{np.mean(times) if times else float('nan'):.2f} s per round")
        self.close()
        return self.history

    def close(self):
        if self.store is not None:
            self.store.close()

    def extra_state(self):
        """Algorithm-specific server state to checkpoint."""
        return {}

    def load_extra_state(self, state):
        pass

    def checkpoint_path(self):
        if not self.args.save_folder_name:
            return None
        return os.path.join(self.args.save_folder_name, run_name(self.args, self.run) + ".pt")

    def fingerprint(self):
        return {k: v for k, v in sorted(vars(self.args).items()) if k not in RESUME_FREE_FLAGS}

    def state_dict(self):
        return {
            "fingerprint": self.fingerprint(),
            "round": self.round,
            "history": self.history.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "clients": (self.remote.state_dict() if self.remote is not None
                        else self.store.checkpoint_state(self.clients)),
            "pending": {client_id: [payload.to_dict() for payload in payloads]
                        for client_id, payloads in self.pending.items()},
            "extra": self.extra_state(),
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
        clients = state["clients"]
        if isinstance(clients, list):  # a checkpoint written before the client-state stores: the states themselves
            clients = {"store": MemoryStore.kind, "states": clients}
        if self.remote is not None:
            self.remote.load_state_dict(clients)
        else:
            self.store.restore(self.clients, clients)
        self.pending = {client_id: [Payload.from_dict(payload) for payload in payloads]
                        for client_id, payloads in state.get("pending", {}).items()}
        self.load_extra_state(state["extra"])

    def save_checkpoint(self):
        """Written to a temporary file and renamed, so a kill during the write keeps the previous checkpoint."""
        path = self.checkpoint_path()
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        # The stores that keep client states on disk may now drop the files only the previous checkpoint needed
        # (a remote without the method keeps its states elsewhere: Flower nodes).
        for holder in (self.store, self.remote):
            if holder is not None and hasattr(holder, "checkpoint_written"):
                holder.checkpoint_written()

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
