"""Loads a federated dataset made by dataset/generate_*.py once, as tensors held in memory for the run."""
import json
import os
import shlex
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from flcore.errors import UserError
from flcore.paths import REPO_ROOT
from fldata.cli import run as run_generation
from fldata.sources import DIGITS, SPECS


@dataclass
class ClientData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class FederatedDataset:
    name: str
    folder: str
    config: dict
    num_classes: int
    image_shape: tuple
    clients: list


def generate_command(name, num_clients):
    """How to (re)make dataset `name`: its generation script, or, for a dataset of the user's own (no script by
    that name), the way it was made."""
    script = f"generate_{name}.py"
    if os.path.isfile(os.path.join(REPO_ROOT, "dataset", script)):
        spec = SPECS.get(name)
        download = " --download" if spec is not None and spec.builtin is None else ""  # else it has no images
        return f"python dataset/{script} --num-clients {num_clients}{download}"
    return (f"the tool that made it (there is no dataset/{script}; dataset/README.md shows how to make a dataset of "
            f"your own)")


def ensure_digits(folder, num_clients):
    """The offline default needs no download: build Digits from scikit-learn's bundled copy when missing."""
    print(f"Dataset Digits not found at {folder}: generating it from scikit-learn's bundled digits "
          f"({num_clients} clients).")
    status = run_generation(DIGITS, ["--num-clients", str(num_clients), "--out", folder])
    if status:
        raise UserError(f"generating Digits into {folder} failed; run {generate_command('Digits', num_clients)}")


def _read_split(path, num_classes, regenerate):
    if not os.path.isfile(path):
        raise UserError(f"missing {path}; regenerate the dataset with: {regenerate}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" in archive:
                x, y = archive["x"], archive["y"]
            else:
                folder = os.path.dirname(os.path.dirname(path))  # path is <folder>/<split>/<i>.npz
                raise UserError(f"{path} has no 'x'/'y' arrays (a reference-library file?); convert the folder "
                                f"with: python dataset/convert_reference.py {shlex.quote(folder)} --trust, "
                                f"or regenerate the dataset with: {regenerate}")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"corrupt or unreadable {path} ({type(exc).__name__}); "
                        f"regenerate the dataset with: {regenerate}") from None
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{path} holds x{tuple(x.shape)} and y{tuple(y.shape)}, expected (N,C,H,W) and (N,); "
                        f"regenerate the dataset with: {regenerate}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{path} has labels outside [0, {num_classes}); check -nb or regenerate with: {regenerate}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))


def keep_shots(x, y, shots, rng):
    """At most `shots` randomly chosen training samples of every class."""
    order = torch.randperm(len(y), generator=rng)
    kept = [order[y[order] == c][:shots] for c in torch.unique(y)]
    index = torch.sort(torch.cat(kept)).values
    return x[index], y[index]


def load_federated_dataset(args, only=None):
    """The dataset of main.py's flags; with `only` (client ids), the arrays of those clients alone (the others are
    None): a Flower node reads its own partition, the Flower server none."""
    folder = os.path.join(args.dataset_dir, args.dataset)
    regenerate = generate_command(args.dataset, args.num_clients)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        if args.dataset == "Digits":
            ensure_digits(folder, args.num_clients)
        elif args.dataset in SPECS:
            raise UserError(f"dataset '{args.dataset}' not found at {folder}; create it with: {regenerate}")
        else:
            raise UserError(f"dataset '{args.dataset}' not found at {folder}: check -data and --dataset_dir; the "
                            f"scripts in dataset/ make {', '.join(sorted(SPECS))}, and dataset/README.md shows how "
                            f"to make a dataset of your own")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable {config_path} ({exc}); regenerate the dataset with: {regenerate}") from None
    missing = [key for key in ("num_classes", "num_clients")
               if not isinstance(config, dict) or not isinstance(config.get(key), int)]
    if missing:
        raise UserError(f"{config_path} has no integer {' and '.join(missing)} (not a generated dataset's config); "
                        f"regenerate the dataset with: {regenerate}")

    if config.get("num_classes") != args.num_classes:
        raise UserError(f"-nb {args.num_classes} disagrees with {config_path} "
                        f"(num_classes={config.get('num_classes')}); pass -nb {config.get('num_classes')}")
    if config.get("num_clients") != args.num_clients:
        raise UserError(f"-nc {args.num_clients} disagrees with {config_path} "
                        f"(num_clients={config.get('num_clients')}); pass -nc {config.get('num_clients')} "
                        f"or regenerate with: {regenerate}")

    clients = []
    for i in range(args.num_clients):
        if only is not None and i not in only:
            clients.append(None)
            continue
        train_x, train_y = _read_split(os.path.join(folder, "train", f"{i}.npz"), args.num_classes, regenerate)
        test_x, test_y = _read_split(os.path.join(folder, "test", f"{i}.npz"), args.num_classes, regenerate)
        if len(train_y) == 0:
            raise UserError(f"client {i} has no training data in {folder}; regenerate with a partition that "
                            f"gives every client data (e.g. a larger --alpha): {regenerate}")
        if args.shots:
            train_x, train_y = keep_shots(train_x, train_y, args.shots, torch.Generator().manual_seed(args.seed + i))
        clients.append(ClientData(train_x, train_y, test_x, test_y))
    shapes = {tuple(c.train_x.shape[1:]) for c in clients if c is not None}
    if not shapes and "image_shape" in config:
        shapes = {tuple(config["image_shape"])}
    if len(shapes) != 1:
        raise UserError(f"clients in {folder} have different image shapes {sorted(shapes)}; "
                        f"regenerate the dataset with: {regenerate}")
    return FederatedDataset(args.dataset, folder, config, args.num_classes, shapes.pop(), clients)
