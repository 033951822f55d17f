"""Converts a dataset folder in the HtFLlib/PFLlib reference format into this project's format, in place.

The reference writes each client's share as ``np.savez_compressed(f, data={'x': x, 'y': y})``: one pickled dict
per ``train/<i>.npz`` and ``test/<i>.npz``, next to a ``config.json`` with ``num_clients``, ``num_classes`` and
its partition settings. Loading such a file unpickles it, and unpickling runs whatever code the file names, so
the conversion only reads them with ``--trust``. Everything that can be checked without unpickling (the folder's
layout, config.json, which arrays the archives hold) is checked first.

The converted folder holds plain ``x`` float32 (N,C,H,W) / ``y`` int64 arrays (see fldata.dataset_io). Its
config.json keeps every key of the original and adds or recomputes, from the arrays, ``image_shape``,
``normalization``, ``train_sizes``, ``test_sizes``, the label statistics and ``conversion``; the original
config.json is kept byte for byte as ``config-reference.json``. The new folder is built in a hidden sibling and
swapped in, so a failure leaves the original as it was; other entries of the folder (e.g. ``rawdata/``) are
carried over.
"""
import argparse
import json
import os
import shutil
import sys
import uuid
import zipfile

import numpy as np
from tqdm import tqdm

from fldata.cli import OneLineErrorParser
from fldata.dataset_io import (
    FORMAT_VERSION,
    LABEL_STATS_KEY,
    NORMALIZATION,
    config_text,
    label_counts,
    save_npz,
    swap_in,
)
from fldata.errors import DatasetError

ORIGINAL_CONFIG_NAME = "config-reference.json"
SPLITS = ("train", "test")
REFERENCE_MEMBERS = frozenset({"data"})  # the pickled {'x', 'y'} dict
PROJECT_MEMBERS = frozenset({"x", "y"})
CHANNEL_COUNTS = (1, 3)  # grayscale or RGB; anything else is most likely channels-last
RANGE_TOLERANCE = 1e-4  # float rounding around the [-1, 1] that mean 0.5 / std 0.5 gives


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="convert_reference.py",
                     description="Convert an HtFLlib/PFLlib dataset folder (config.json, train/<i>.npz, "
                                 "test/<i>.npz holding pickled {'x', 'y'} dicts) into this project's format, "
                                 "in place.")
    parser.add_argument("folder", help="the dataset folder, e.g. dataset/Cifar10")
    parser.add_argument("--trust", action="store_true",
                        help="allow unpickling the folder's files; unpickling runs any code a file contains, "
                             "so pass it only for files you made or whose source you trust")
    return parser


def run(argv: list[str] | None = None) -> int:
    """The script's main(): 0 when converted or already converted, 2 after a one-line ``error: ...`` on stderr."""
    try:
        options = build_parser().parse_args(argv)
        convert(options.folder, options.trust)
    except (DatasetError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


def convert(folder: str, trust: bool) -> bool:
    """Converts ``folder`` in place; returns False if it already is in this project's format."""
    folder = os.path.realpath(folder)  # a symlinked folder is converted where its files are
    reference_config = read_reference_config(folder)
    num_clients, num_classes = reference_config["num_clients"], reference_config["num_classes"]
    check_client_files(folder, num_clients)
    formats = {archive_format(os.path.join(folder, split, f"{client}.npz"))
               for split in SPLITS for client in range(num_clients)}
    if formats == {"project"}:
        print(f"{folder} is already in this project's format (plain x/y arrays); nothing to do")
        return False
    if formats != {"reference"}:
        raise DatasetError(f"{folder} mixes reference-format files with files in this project's format; "
                           f"restore the reference files or regenerate the dataset")
    if not trust:
        raise DatasetError(f"{folder} holds pickled reference-format files: reading them unpickles them, which "
                           f"runs any code a file contains; pass --trust if you made them or trust their source")
    if os.path.exists(os.path.join(folder, ORIGINAL_CONFIG_NAME)):
        raise DatasetError(f"{folder} already has {ORIGINAL_CONFIG_NAME}, where the conversion keeps the "
                           f"original config.json; move it away and rerun")

    parent, name = os.path.split(folder)
    staging = os.path.join(parent, f".{name}.converting-{uuid.uuid4().hex}")
    os.mkdir(staging)  # not tempfile.mkdtemp: its 0700 mode would stick to the dataset folder
    try:
        for split in SPLITS:
            os.mkdir(os.path.join(staging, split))
        stats = write_converted_clients(folder, staging, num_clients, num_classes)
        shutil.copyfile(os.path.join(folder, "config.json"), os.path.join(staging, ORIGINAL_CONFIG_NAME))
        config = {
            **reference_config,
            **stats,
            "normalization": dict(NORMALIZATION),
            "conversion": {"from": "HtFLlib/PFLlib reference format (pickled {'x', 'y'} dict per client)",
                           "format": FORMAT_VERSION, "original_config": ORIGINAL_CONFIG_NAME},
        }
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as file:
            file.write(config_text(config))
        swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"converted {num_clients} clients ({sum(config['train_sizes'])} train / {sum(config['test_sizes'])} "
          f"test samples) in {folder}; the original config.json is kept as {ORIGINAL_CONFIG_NAME}")
    return True


def read_reference_config(folder: str) -> dict:
    """config.json as a dict whose num_clients and num_classes are positive integers."""
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder} is not a folder" if os.path.exists(folder) else f"{folder} does not exist")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise DatasetError(f"{folder} has no config.json; expected a reference-format dataset folder "
                           f"(config.json, train/<i>.npz, test/<i>.npz)")
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except ValueError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise DatasetError(f"{path} must hold a JSON object")
    for key in ("num_clients", "num_classes"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetError(f"{path} must give {key} as a positive integer, got {value!r}")
    return config


def check_client_files(folder: str, num_clients: int) -> None:
    """train/ and test/ hold exactly 0.npz .. <num_clients - 1>.npz, so the conversion drops nothing."""
    expected = {f"{client}.npz" for client in range(num_clients)}
    for split in SPLITS:
        split_dir = os.path.join(folder, split)
        if not os.path.isdir(split_dir):
            raise DatasetError(f"{folder} has no {split}/ folder")
        present = set(os.listdir(split_dir))
        missing = sorted(expected - present, key=lambda file_name: int(file_name.split(".")[0]))
        extra = sorted(present - expected)
        if missing:
            raise DatasetError(f"{split_dir} lacks {', '.join(missing[:3])} (config.json says "
                               f"num_clients={num_clients})")
        if extra:
            raise DatasetError(f"{split_dir} holds {', '.join(extra[:3])} beyond the {num_clients} clients of "
                               f"config.json; move them away and rerun")


def archive_format(path: str) -> str:
    """'reference', 'project' or 'unknown', from the names of the archive's arrays; nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:  # only the zip directory is read, never an array
            members = frozenset(name.removesuffix(".npy") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path} is not a readable .npz archive ({type(exc).__name__})") from None
    if members == REFERENCE_MEMBERS:
        return "reference"
    if members == PROJECT_MEMBERS:
        return "project"
    raise DatasetError(f"{path} holds arrays {sorted(members)}; expected the reference format's 'data' "
                       f"or this project's 'x' and 'y'")


def write_converted_clients(folder: str, staging: str, num_clients: int, num_classes: int) -> dict:
    """Writes every client's arrays into ``staging``; returns image_shape, the split sizes and label stats."""
    image_shape = None
    sizes = {split: [] for split in SPLITS}
    label_stats = []
    for client in tqdm(range(num_clients), desc="converting clients", unit="client", disable=None):
        labels = []
        for split in SPLITS:
            path = os.path.join(folder, split, f"{client}.npz")
            x, y = read_reference_file(path, num_classes)
            if image_shape is None:
                image_shape = x.shape[1:]
            elif x.shape[1:] != image_shape:
                raise DatasetError(f"{path} has images of shape {x.shape[1:]}, other clients {image_shape}")
            if split == "train" and len(y) == 0:
                raise DatasetError(f"{path} has no samples; every client needs training data")
            save_npz(os.path.join(staging, split, f"{client}.npz"), x=x, y=y)
            sizes[split].append(len(y))
            labels.append(y)
        label_stats.append(label_counts(np.concatenate(labels)))
    return {"image_shape": [int(size) for size in image_shape], "train_sizes": sizes["train"],
            "test_sizes": sizes["test"], LABEL_STATS_KEY: label_stats}


def read_reference_file(path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpickles one client file and checks it: x float (N,C,H,W) in [-1, 1], y N labels in [0, num_classes)."""
    try:
        with np.load(path, allow_pickle=True) as archive:
            data = archive["data"]
            content = data.item() if data.dtype == object and data.ndim == 0 else None
    except Exception as exc:  # unpickling raises whatever the pickled objects' code raises
        raise DatasetError(f"{path} could not be unpickled ({type(exc).__name__}: {exc})") from None
    if not isinstance(content, dict) or not {"x", "y"} <= set(content):
        raise DatasetError(f"{path} does not hold the reference format's dict with 'x' and 'y'")
    x, y = np.asarray(content["x"]), np.asarray(content["y"])
    if x.ndim != 4 or x.shape[1] not in CHANNEL_COUNTS:
        raise DatasetError(f"{path} has x of shape {x.shape}; expected images (N, C, H, W) with C in "
                           f"{CHANNEL_COUNTS} (channels first)")
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetError(f"{path} has x of dtype {x.dtype}; expected float images normalized with mean 0.5 "
                           f"and std 0.5 (values in [-1, 1])")
    if len(x) and not (np.isfinite(x).all() and x.min() >= -1 - RANGE_TOLERANCE and x.max() <= 1 + RANGE_TOLERANCE):
        raise DatasetError(f"{path} has x values in [{x.min():g}, {x.max():g}]; expected images normalized with "
                           f"mean 0.5 and std 0.5 (values in [-1, 1])")
    if y.ndim != 1 or len(y) != len(x) or not (np.issubdtype(y.dtype, np.integer) or len(y) == 0):
        raise DatasetError(f"{path} has y of shape {y.shape} and dtype {y.dtype}; expected {len(x)} integer labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(f"{path} has labels in [{y.min()}, {y.max()}]; config.json says num_classes="
                           f"{num_classes}, so they must be in [0, {num_classes})")
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)
