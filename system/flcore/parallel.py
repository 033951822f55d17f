"""Clients trained in parallel (-pc N): the Runner's engine is a pool of N worker processes, each owning a fixed
share of the clients, built there exactly as in this process (runner.build_clients, from the same ClientPlan) and
kept in the worker's own store (memory, --offload or disk). A round's turns go to their owners at once and run with the same take_turn;
the replies come back in request order. A turn depends only on its client's state and its request (flcore/
exchange.py), so the results equal sequential training bit for bit when each worker computes with the threads a
sequential run used (with --num_threads N x T, each worker gets T).

Workers with one CPU thread are forked (instant: they inherit the loaded modules and data); others are spawned,
since a forked child that runs OpenMP with more than one thread hangs on the parent's thread pool (seen here
with torch 2.14) and a CUDA context does not survive a fork. On CUDA worker k takes GPU (-did + k // N) modulo the
visible GPUs, N = --workers_per_gpu (several small clients' workers can share one large GPU). Messages are torch.save'd bytes over a pipe (copies; no shared memory to outlive a worker), loaded
straight onto the receiver's device."""
import dataclasses
import io
import multiprocessing
import signal
import traceback
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from flcore.client_store import DiskStore, merge_checkpoint_states, state_bytes
from flcore.errors import UserError, out_of_memory
from flcore.runner import build_clients, run_client_turns, store_choice_line
from flcore.trainmodel import family_models


@dataclass
class WorkerSetup:
    """What a worker builds its share of the clients from: the run's ClientPlan, its data cut to the share."""
    plan: object  # flcore.runner.ClientPlan, without reference_model (it stays with the runner)
    device: str
    threads: int


def pack(message):
    buffer = io.BytesIO()
    torch.save(message, buffer)
    return buffer.getvalue()


def unpack(data, device):
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def serve(connection, setup):
    """A worker's life: build its clients, then answer commands until "close"."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker must not inherit main.py's resume-hint handler
    torch.set_num_threads(setup.threads)
    device = torch.device(setup.device)
    plan = dataclasses.replace(setup.plan, device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = plan.settings.cudnn_benchmark

    def answer(work):
        try:
            connection.send_bytes(pack(("ok", work())))
        except UserError as exc:
            connection.send_bytes(pack(("user_error", str(exc))))
        except torch.OutOfMemoryError as exc:
            connection.send_bytes(pack(("user_error", str(out_of_memory(exc)))))
        except Exception:  # noqa: BLE001 - reported to the server, which stops the run with it
            connection.send_bytes(pack(("error", traceback.format_exc())))

    share = {}

    def build():
        share["clients"], share["store"] = build_clients(plan, sorted(plan.data))
        return share["store"].kind, [state_bytes(client) for client in share["clients"].values()]

    def spill():
        """To disk, as a sequential run's --client_state auto does, when another worker's estimate spilled."""
        share["store"] = DiskStore(*plan.store_location, owned=set(plan.data))
        for client in share["clients"].values():
            share["store"].add(client)

    answer(build)
    commands = {
        "turns": lambda body: run_client_turns(share["clients"], share["store"], body, plan.server_cls.upload_phase),
        "state": lambda body: share["store"].checkpoint_state(list(share["clients"].values())),
        "restore": lambda body: share["store"].restore(list(share["clients"].values()), body),
        "checkpoint_written": lambda body: share["store"].checkpoint_written(),
        "spill": lambda body: spill(),
        "close": lambda body: share["store"].close(),
    }
    while True:
        command, body = unpack(connection.recv_bytes(), device)
        answer(lambda: commands[command](body))
        if command == "close":
            return


def forward_flops(model, image_shape):
    """FLOPs of one sample's forward pass (model in eval mode: BatchNorm takes a batch of one)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *image_shape))
    return counter.get_total_flops()


def balanced_shares(costs, workers):
    """Client ids split into `workers` shares of near-equal total cost: the costliest client first, each to the
    share with the least cost so far (ties: the lower id), so the slowest worker sets the round's pace as little
    as a fixed split allows."""
    loads = [0.0] * workers
    shares = [[] for _ in range(workers)]
    for client_id in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        worker = min(range(workers), key=lambda k: (loads[k], k))
        shares[worker].append(client_id)
        loads[worker] += costs[client_id]
    return [sorted(share) for share in shares]


def worker_gpu(worker, first, workers_per_gpu, gpus):
    """The GPU index of worker `worker`: `workers_per_gpu` consecutive workers share a GPU, from GPU `first` on,
    round robin over the `gpus` visible ones."""
    return (first + worker // workers_per_gpu) % gpus


class ClientPool:
    """The engine that runs a run's clients in `workers` processes (the Runner's engine, as LocalClients):
    start(plan), run_turns, state_dict, load_state_dict, checkpoint_written; close() ends the workers."""

    def __init__(self, workers, threads):
        self.workers = workers
        self.threads = threads
        self.connections, self.processes, self.shares = [], [], []
        self.owner = {}
        self.device = torch.device("cpu")
        self.workers_per_gpu = 1

    def client_costs(self, plan):
        """Each client's training cost, estimated as its model's forward FLOPs times its training samples:
        deterministic and free. A timed training step per model was tried and ranked the models worse on this
        shared 2-core machine (single steps are noisy, and a turn also holds FedKTL's transfer step, evaluation and
        the prototype pass); FLOPs miss that depthwise and NHWC convolutions cost more or less per FLOP."""
        family_size = len(family_models(plan.settings.model_family))
        flops = {}
        costs = []
        for client_id in sorted(plan.data):
            member = client_id % family_size
            if member not in flops:
                flops[member] = forward_flops(plan.reference_model(client_id), plan.image_shape)
            costs.append(flops[member] * max(len(plan.data[client_id].train_y), 1))
        return costs

    def start(self, plan):
        """Spawns the workers and builds their clients; all wait in memory, or all on disk when one worker's
        --client_state auto estimate says the run does not fit."""
        self.num_clients = plan.settings.num_clients
        self.device = plan.device
        self.workers_per_gpu = plan.settings.workers_per_gpu
        self.shares = balanced_shares(self.client_costs(plan), self.workers)
        self.owner = {client_id: worker for worker, share in enumerate(self.shares) for client_id in share}
        forkable = self.threads == 1 and self.device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if forkable else "spawn")
        for worker, share in enumerate(self.shares):
            worker_plan = dataclasses.replace(plan, data={i: plan.data[i] for i in share}, reference_model=None)
            setup = WorkerSetup(worker_plan, str(self.worker_device(worker)), self.threads)
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(theirs, setup), daemon=True,
                                      name=f"fl-clients-{worker}")
            process.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(process)
        built = [self.receive(worker) for worker in range(self.workers)]
        if {kind for kind, _ in built} == {"memory", "disk"}:
            self.broadcast("spill")
        if plan.settings.client_state == "auto":
            sizes = [size for _, worker_sizes in built for size in worker_sizes]
            kind = "disk" if any(kind == "disk" for kind, _ in built) else "memory"
            tqdm.write(store_choice_line(kind, plan.store_location[0], sizes, self.num_clients))
        tqdm.write(f"clients in {self.workers} worker processes ({self.threads} CPU thread(s) each): "
                   + "; ".join(f"clients {', '.join(map(str, share))}" if len(share) <= 8 else f"{len(share)} clients"
                               for share in self.shares))

    def worker_device(self, worker):
        if self.device.type != "cuda":
            return self.device
        first = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return torch.device("cuda", worker_gpu(worker, first, self.workers_per_gpu, torch.cuda.device_count()))

    def send(self, worker, command, body=None):
        self.connections[worker].send_bytes(pack((command, body)))

    def receive(self, worker):
        try:
            status, result = unpack(self.connections[worker].recv_bytes(), self.device)
        except EOFError:
            raise RuntimeError(f"client worker {worker} ended unexpectedly (exit code "
                               f"{self.processes[worker].exitcode}); see its output above") from None
        if status == "user_error":
            raise UserError(result)
        if status == "error":
            raise RuntimeError(f"client worker {worker} failed:\n{result}")
        return result

    def broadcast(self, command, body=None):
        """The same command to every worker started so far, at once; their results in worker order."""
        started = range(len(self.connections))
        for worker in started:
            self.send(worker, command, body)
        return [self.receive(worker) for worker in started]

    def run_turns(self, requests):
        by_worker = [{} for _ in range(self.workers)]
        for client_id, request in requests.items():
            by_worker[self.owner[client_id]][client_id] = request
        busy = [worker for worker in range(self.workers) if by_worker[worker]]
        for worker in busy:
            self.send(worker, "turns", by_worker[worker])
        replies = {}
        for worker in busy:
            replies.update(self.receive(worker))
        return {client_id: replies[client_id] for client_id in requests}

    def state_dict(self):
        """The client states in the format of a sequential run's store, so either kind of run resumes the other."""
        return merge_checkpoint_states(self.broadcast("state"), self.shares, self.num_clients)

    def load_state_dict(self, state):
        self.broadcast("restore", state)

    def checkpoint_written(self):
        self.broadcast("checkpoint_written")

    def close(self):
        """Ends the workers: each closes its store first (a disk store keeps what the last checkpoint needs). A
        worker that is gone or failing (a crash, Ctrl-C) is not waited for: the run stops with the error that
        ended it, not with this one."""
        try:
            self.broadcast("close")
        except (RuntimeError, OSError, UserError):
            pass
        finally:
            for process in self.processes:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
            for connection in self.connections:
                connection.close()
            self.connections, self.processes = [], []
