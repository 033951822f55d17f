"""Per-client train/test split and the on-disk layout: ``config.json``, ``train/<i>.npz``, ``test/<i>.npz``.

Each npz holds plain arrays (no pickle): ``x`` float32 NCHW normalized with mean 0.5 / std 0.5,
``y`` int64. Archives carry a fixed timestamp, so the same inputs give byte-identical files.
"""
import io
import json
import math
import os
import shutil
import uuid
import zipfile

import numpy as np
from tqdm import tqdm

from fldata.errors import DatasetError

FORMAT_VERSION = 2  # bump when the written files change for the same parameters
NORMALIZATION = {"mean": 0.5, "std": 0.5}
LABEL_STATS_KEY = "Size of samples for labels in clients"
GENERATED_ENTRIES = ("config.json", "train", "test")
CARRIED_ENTRIES = ("rawdata",)  # downloads live next to the generated files and survive regeneration
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def validate_train_ratio(train_ratio: float) -> None:
    if not 0 < train_ratio < 1:
        raise DatasetError(f"--train-ratio must be in (0, 1), got {train_ratio}")


def split_train_test(client_indices: list[np.ndarray], train_ratio: float,
                     rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffles each client's indices and cuts them into (train, test); both must be non-empty."""
    validate_train_ratio(train_ratio)
    splits = []
    for client, indices in enumerate(client_indices):
        shuffled = rng.permutation(indices)
        num_train = math.floor(train_ratio * len(shuffled) + 1e-9)  # tolerance: 0.29 * 100 is 28.999...
        if not 0 < num_train < len(shuffled):
            raise DatasetError(
                f"client {client} has {len(shuffled)} samples, which --train-ratio {train_ratio} splits into "
                f"{num_train} train / {len(shuffled) - num_train} test; each needs one: "
                f"lower --num-clients or change --train-ratio")
        splits.append((shuffled[:num_train], shuffled[num_train:]))
    return splits


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1]: (pixel / 255 - mean) / std."""
    scaled = images.astype(np.float32) / 255.0
    normalized = (scaled - NORMALIZATION["mean"]) / NORMALIZATION["std"]
    return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2))


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed, but with a fixed member timestamp so the bytes depend only on the arrays."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            member = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE_TIME)
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            archive.writestr(member, buffer.getvalue())


def label_counts(labels: np.ndarray) -> list[list[int]]:
    """[[class, count], ...] for the classes present, as in the reference config."""
    classes, counts = np.unique(labels, return_counts=True)
    return [[int(c), int(n)] for c, n in zip(classes, counts)]


def is_up_to_date(out_dir: str, params: dict) -> bool:
    """True if ``out_dir`` holds a complete dataset generated with exactly ``params``."""
    try:
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("params") != json.loads(json.dumps(params)):
        return False
    num_clients = config.get("num_clients")
    return isinstance(num_clients, int) and all(os.path.isfile(os.path.join(out_dir, split, f"{client}.npz"))
                                                for split in ("train", "test") for client in range(num_clients))


def check_output_dir(out_dir: str) -> None:
    """Refuses to replace a folder that holds something other than a generated dataset."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DatasetError(f"--out {out_dir} is a file; pass a folder path")
    if not os.path.isdir(out_dir) or os.path.isfile(os.path.join(out_dir, "config.json")):
        return
    foreign = sorted(set(os.listdir(out_dir)) - set(GENERATED_ENTRIES) - set(CARRIED_ENTRIES))
    if foreign:
        raise DatasetError(f"--out {out_dir} is not a generated dataset (it holds {', '.join(foreign[:3])}); "
                           f"pass a new or empty folder")


def write_dataset(out_dir: str, images: np.ndarray, labels: np.ndarray,
                  splits: list[tuple[np.ndarray, np.ndarray]], info: dict) -> dict:
    """Writes the clients' files and config.json (``info`` plus sizes and label counts); returns the config.

    Builds everything in a hidden sibling folder and swaps it in, so a failure leaves ``out_dir`` as it was.
    """
    config = {
        **info,
        "image_shape": [int(images.shape[3]), int(images.shape[1]), int(images.shape[2])],
        "normalization": dict(NORMALIZATION),
        "train_sizes": [len(train) for train, _ in splits],
        "test_sizes": [len(test) for _, test in splits],
        LABEL_STATS_KEY: [label_counts(labels[np.concatenate(split)]) for split in splits],
    }
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.building-{uuid.uuid4().hex}")
    os.mkdir(staging)  # not tempfile.mkdtemp: its 0700 mode would stick to the dataset folder
    try:
        for split in ("train", "test"):
            os.mkdir(os.path.join(staging, split))
        for client, (train, test) in enumerate(tqdm(splits, desc="writing clients", unit="client", disable=None)):
            for split, indices in (("train", train), ("test", test)):
                save_npz(os.path.join(staging, split, f"{client}.npz"),
                         x=normalize_images(images[indices]), y=labels[indices].astype(np.int64))
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as file:
            file.write(config_text(config))
        swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config


def config_text(config: dict) -> str:
    """JSON with one top-level key per line, values kept compact."""
    lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in config.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def swap_in(staging: str, out_dir: str) -> None:
    """Renames ``staging`` to ``out_dir``, keeping the carried entries (e.g. rawdata/) of an existing ``out_dir``."""
    if not os.path.isdir(out_dir):
        os.rename(staging, out_dir)
        return
    replaced = staging + "-replaced"
    os.rename(out_dir, replaced)
    for entry in set(os.listdir(replaced)) - set(GENERATED_ENTRIES):
        os.rename(os.path.join(replaced, entry), os.path.join(staging, entry))
    os.rename(staging, out_dir)
    shutil.rmtree(replaced)
