"""Where each client's state lives between its turns, in one place.

`MemoryStore` keeps every client resident (fast; memory grows with clients x model size). `DiskStore` keeps one
client resident at a time: after its turn the client's `state_dict()` (model, optimizer, scheduler, RNG and the
algorithm's extras) is written to one safetensors file (tensors, plus the rest as JSON in the file's metadata: no
code runs when it is read) and the tensors of its `state_modules()` are freed; the next turn allocates and reads
them back exactly. Files are written under a fresh name and renamed into place, and a file the last checkpoint
refers to is never removed or overwritten, so a run killed at any point resumes from its last checkpoint.
"""
import ctypes
import ctypes.util
import json
import math
import os
import re
import secrets
from contextlib import contextmanager

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from flcore.errors import UserError

STATE_FILE = re.compile(r"^client_(\d{5})_[0-9a-f]{8}\.safetensors$")
# Resident state per client, as a multiple of its state modules' tensors: weights, gradients, and headroom for the
# optimizer and activations; `auto` spills to disk when the estimate exceeds this share of the available memory.
STATE_MULTIPLE = 3
AVAILABLE_SHARE = 0.6


def _c_library():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


LIBC = _c_library()


def return_freed_memory():
    """Hands the heap memory freed by released clients back to the system. glibc keeps freed blocks of a size it
    has seen freed before (its adaptive mmap threshold), so without this the resident memory of a disk-store run
    grows with every client turn although nothing is held (measured: 2.6 GiB vs 1.2 GiB at 40 HtFE8 clients)."""
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def available_memory_bytes():
    """MemAvailable from /proc/meminfo (Linux), else the free physical pages; None when neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def state_tensors(client):
    """The distinct parameter and buffer tensors of the client's state modules, in a fixed order."""
    seen, holders = set(), []
    for module in client.state_modules():
        for owner in module.modules():
            for table in (owner._parameters, owner._buffers):
                for name, tensor in table.items():
                    if tensor is not None and id(tensor) not in seen:
                        seen.add(id(tensor))
                        holders.append(tensor)
    return holders


def state_bytes(client):
    return sum(t.numel() * t.element_size() for t in state_tensors(client))


def encode(value, tensors, path):
    """A nested state (dicts with any keys, lists, tuples, tensors, scalars) -> JSON-able skeleton; each tensor goes
    into `tensors` under its path."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        # safetensors refuses tensors that share memory; a clone makes each entry its own.
        tensors[path] = tensor.to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if isinstance(value, dict):
        return {"dict": [[encode(k, tensors, f"{path}.k{i}"), encode(v, tensors, f"{path}.{i}")]
                         for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": repr(float(value))} if not math.isfinite(value) else float(value)
    raise TypeError(f"cannot store a {type(value).__name__} in a client state file ({path})")


def decode(skeleton, tensors):
    if isinstance(skeleton, dict):
        (kind, body), = skeleton.items()
        if kind == "tensor":
            return tensors[body]
        if kind == "dict":
            return {decode(k, tensors): decode(v, tensors) for k, v in body}
        if kind == "list":
            return [decode(v, tensors) for v in body]
        if kind == "tuple":
            return tuple(decode(v, tensors) for v in body)
        if kind == "float":
            return float(body)
    return skeleton


def write_state_file(path, value, metadata=None):
    """`value` (a nested state, see `encode`) as one safetensors file: its tensors, the rest as JSON in the file's
    metadata under "state" (so reading runs no code), plus `metadata`; written under a temporary name and renamed,
    so `path` is whole or absent. An OSError propagates after the temporary file is removed."""
    tensors = {}
    skeleton = encode(value, tensors, "s")
    temporary = path + ".tmp"
    try:
        save_file(tensors, temporary, metadata={"state": json.dumps(skeleton), **(metadata or {})})
        os.replace(temporary, path)
    except OSError:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_state_file(path, tensors=True):
    """(the state written by `write_state_file`, on the CPU, or None when `tensors` is False or the file holds no
    state; the file's metadata). Raises OSError or SafetensorError for an unreadable file."""
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        # Copied out of the file's memory map: a small tensor a client keeps (a permutation, prototypes) would
        # otherwise keep the whole mapped file resident.
        stored = {key: f.get_tensor(key).clone() for key in f.keys()} if tensors else {}
    state = decode(json.loads(metadata["state"]), stored) if tensors and "state" in metadata else None
    return state, metadata


def normalized(state):
    """A checkpoint's client states in the stores' format; checkpoints written before the stores hold the states
    themselves, as a list by client id."""
    return {"store": MemoryStore.kind, "states": state} if isinstance(state, list) else state


def merge_checkpoint_states(parts, shares, num_clients):
    """One checkpoint state (the format of a store's checkpoint_state) from the states of workers' stores, worker
    k holding the clients shares[k]: so a run in workers and one in this process resume each other."""
    if parts[0]["store"] == DiskStore.kind:
        files = {}
        for part in parts:
            files.update(part["files"])
        return {**parts[0], "files": dict(sorted(files.items()))}
    states = [None] * num_clients
    for share, part in zip(shares, parts):
        for client_id, state in zip(share, part["states"]):
            states[client_id] = state
    return {"store": MemoryStore.kind, "states": states}


class MemoryStore:
    """Every client resident, as in the reference library's simulation; checkpoints hold the client states."""
    kind = "memory"

    def add(self, client):
        pass

    @contextmanager
    def loaded(self, client, modify=True):
        yield client

    def checkpoint_state(self, clients):
        return {"store": self.kind, "states": [client.state_dict() for client in clients]}

    def restore(self, clients, state):
        state = normalized(state)
        for client in clients:
            if state.get("store") == self.kind:
                client_state = state["states"][client.id]
            else:  # checkpointed with the disk store: read its files
                path = os.path.join(state["folder"], state["files"][client.id])
                client_state = DiskStore.read(path, state["run"], client.id)
            client.load_state_dict(client_state)

    def checkpoint_written(self):
        pass

    def close(self):
        pass


class OffloadStore(MemoryStore):
    """--offload: every client held in CPU memory; its state modules' tensors and optimizer state move to its
    device for its turn and back afterwards, so the GPU holds one client's model at a time (the data, and small
    extras outside the state modules such as FedKTL's pairs, stay on the device). Checkpoints are the memory
    store's. On the CPU every move is to where the tensor already is."""

    def __init__(self, home=torch.device("cpu")):
        self.home = home
        self.resident = set()

    def add(self, client):
        self.move(client, self.home)

    @contextmanager
    def loaded(self, client, modify=True):
        if client.id in self.resident:  # nested (a reply during the client's turn): the outer block moves it back
            yield client
            return
        self.move(client, client.device)
        self.resident.add(client.id)
        try:
            yield client
        finally:
            self.resident.discard(client.id)
            self.move(client, self.home)

    @staticmethod
    def move(client, device):
        for tensor in state_tensors(client):
            tensor.data = tensor.data.to(device)
            tensor.grad = None  # not part of the state: every step starts from zero gradients
        for values in client.optimizer.state.values():
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:  # Adam's step counts stay where they are
                    values[key] = value.to(device)


class DiskStore:
    """One client resident at a time; the others wait on disk in `folder` (one file per client). `owned`: the ids of
    the clients whose files this store manages when other stores share the folder (parallel workers,
    flcore/parallel.py); None: every file in the folder is its own."""
    kind = "disk"

    def __init__(self, folder, run_key, keep_for_checkpoints, owned=None):
        self.folder = folder
        self.owned = owned
        self.run_key = run_key
        self.keep_for_checkpoints = keep_for_checkpoints
        self.current = {}  # client id -> file holding its latest state
        self.checkpointed = {}  # client id -> file the last checkpoint refers to
        self.shapes = {}  # client id -> (shape, strides, dtype) of each state tensor, to allocate them again
        self.resident = set()  # ids of the clients inside `loaded` now
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".probe_{secrets.token_hex(4)}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise UserError(f"--client_state_dir {folder} is not writable ({exc.strerror or exc}); choose another "
                            f"folder with --client_state_dir") from None

    def file_path(self, name):
        return os.path.join(self.folder, name)

    def sweep(self, keep):
        """Removes the state files in the folder that are not in `keep` (older versions, an earlier run's)."""
        for name in os.listdir(self.folder):
            match = STATE_FILE.match(name)
            if match and name not in keep and (self.owned is None or int(match.group(1)) in self.owned):
                os.remove(self.file_path(name))

    def add(self, client):
        """Takes a freshly built client: writes its state and frees its tensors."""
        self.save(client)
        self.release(client)

    @contextmanager
    def loaded(self, client, modify=True):
        """The client with its state in memory for the block; written back afterwards when `modify`. A block that
        raises leaves the stored state as it was."""
        if client.id in self.resident:  # nested (a reply during the client's turn): the outer block saves
            yield client
            return
        self.load(client)
        self.resident.add(client.id)
        try:
            yield client
            if modify:
                self.save(client)
        finally:
            self.resident.discard(client.id)
            self.release(client)

    def save(self, client):
        name = f"client_{client.id:05d}_{secrets.token_hex(4)}.safetensors"
        try:
            write_state_file(self.file_path(name), client.state_dict(),
                             {"run": self.run_key, "client": str(client.id)})
        except OSError as exc:
            raise UserError(f"writing client {client.id}'s state to {self.folder} failed ({exc.strerror or exc}); "
                            f"free space or choose another --client_state_dir, then rerun with --resume (the last "
                            f"checkpoint is still valid)") from None
        previous = self.current.get(client.id)
        self.current[client.id] = name
        if previous is not None and previous != self.checkpointed.get(client.id):
            os.remove(self.file_path(previous))

    @staticmethod
    def read(path, run_key=None, client_id=None, tensors=True):
        """The state saved in `path` (only checked, without reading its tensors, when `tensors` is False); with
        `run_key`/`client_id`, refused unless it was written for that run and client."""
        try:
            state, metadata = read_state_file(path, tensors)
        except (OSError, SafetensorError) as exc:
            raise UserError(f"cannot read client state {path} ({exc}); rerun without --resume to start over") from None
        if "state" not in metadata:
            raise UserError(f"{path} is not a client state file of this project; rerun without --resume")
        if run_key is not None and (metadata.get("run") != run_key or metadata.get("client") != str(client_id)):
            raise UserError(f"{path} holds the state of another run or client; point --client_state_dir at this "
                            f"run's folder, or rerun without --resume to start over")
        # On the CPU, as a checkpoint is read: the client's load_state_dict moves what belongs on its device.
        return state

    def load(self, client):
        state = self.read(self.file_path(self.current[client.id]), self.run_key, client.id)
        for tensor, (shape, strides, dtype) in zip(state_tensors(client), self.shapes[client.id]):
            # The same strides: a channels-last model stays channels-last.
            tensor.data = torch.empty_strided(shape, strides, dtype=dtype, device=client.device)
        client.load_state_dict(state)

    def release(self, client):
        holders = state_tensors(client)
        if client.id not in self.shapes:
            self.shapes[client.id] = [(tuple(t.shape), t.stride(), t.dtype) for t in holders]
        for tensor in holders:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            tensor.grad = None  # not part of the state: every step starts from zero gradients
        client.optimizer.state.clear()
        return_freed_memory()

    def checkpoint_state(self, clients):
        return {"store": self.kind, "files": dict(self.current), "run": self.run_key,
                "folder": os.path.abspath(self.folder)}

    def restore(self, clients, state):
        state = normalized(state)
        if state.get("store") == self.kind:
            own = {client.id for client in clients}
            files = {int(k): v for k, v in state["files"].items() if int(k) in own}
            missing = [name for name in files.values() if not os.path.isfile(self.file_path(name))]
            if missing:
                raise UserError(f"the checkpoint refers to client states missing from {self.folder} ({missing[0]}, "
                                f"...); point --client_state_dir at the folder the run used, or rerun without "
                                f"--resume")
            for client in clients:
                # Foreign files are refused now rather than in the middle of a round.
                self.read(self.file_path(files[client.id]), self.run_key, client.id, tensors=False)
            self.current = dict(files)
            self.checkpointed = dict(files)
            self.sweep(set(files.values()))
            return
        for client in clients:
            with self.loaded(client):
                client.load_state_dict(state["states"][client.id])

    def checkpoint_written(self):
        """The checkpoint now refers to the current files: the ones only the previous checkpoint used can go."""
        self.checkpointed = dict(self.current)
        self.sweep(set(self.current.values()))

    def close(self):
        """After the run: keep only what the last checkpoint refers to (everything goes without checkpoints)."""
        keep = set(self.checkpointed.values()) if self.keep_for_checkpoints else set()
        self.sweep(keep)
        self.current = {cid: name for cid, name in self.current.items() if name in keep}
        for folder in (self.folder, os.path.dirname(self.folder)):  # the run's folder, then the store's root
            try:
                if not os.listdir(folder):
                    os.rmdir(folder)
            except OSError:  # gone already, or another worker's store wrote into it meanwhile
                pass
