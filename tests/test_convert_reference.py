"""dataset/convert_reference.py: HtFLlib/PFLlib folders refused without --trust, converted in place with it."""
import json
import os
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

import fldata.reference
from fldata.cli import DATASET_DIR
from fldata.dataset_io import LABEL_STATS_KEY
from flutils.data import load_federated_dataset
from flcore.errors import UserError

SCRIPT = os.path.join(DATASET_DIR, "convert_reference.py")
NAME = "RefCifar"
NUM_CLIENTS, NUM_CLASSES, IMAGE_SHAPE = 3, 4, (3, 8, 8)


def reference_images(rng, count):
    """What the reference stores: ToTensor() then Normalize(0.5, 0.5) of uint8 pixels, float32 NCHW."""
    pixels = rng.integers(0, 256, (count, *IMAGE_SHAPE)).astype(np.float32)
    return (pixels / 255 - 0.5) / 0.5


def save_reference_file(path, x, y):
    with open(path, "wb") as file:  # exactly the reference's call: a dict, so numpy pickles it
        np.savez_compressed(file, data={"x": x, "y": y})


def assert_one_line_error(stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(fragment in lines[0] for fragment in fragments), stderr


@pytest.fixture
def reference(tmp_path):
    """A 3-client reference-format folder, its arrays {(split, client): (x, y)} and its config.json bytes."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "datasets" / NAME
    arrays, label_stats = {}, []
    for split in ("train", "test"):
        (folder / split).mkdir(parents=True)
    for client in range(NUM_CLIENTS):
        labels = rng.integers(0, NUM_CLASSES, 8).astype(np.int64)
        for split, part in (("train", labels[:6]), ("test", labels[6:])):
            arrays[split, client] = reference_images(rng, len(part)), part
            save_reference_file(folder / split / f"{client}.npz", *arrays[split, client])
        classes, counts = np.unique(labels, return_counts=True)
        label_stats.append([(int(c), int(n)) for c, n in zip(classes, counts)])
    config = {"num_clients": NUM_CLIENTS, "num_classes": NUM_CLASSES, "non_iid": True, "balance": False,
              "partition": "dir", LABEL_STATS_KEY: label_stats, "alpha": 0.1, "batch_size": 10}
    config_bytes = json.dumps(config, separators=(",", ":")).encode()  # compact, as ujson.dump writes it
    (folder / "config.json").write_bytes(config_bytes)
    return SimpleNamespace(folder=folder, arrays=arrays, config_bytes=config_bytes)


def load(folder):
    args = SimpleNamespace(dataset=folder.name, dataset_dir=str(folder.parent), num_clients=NUM_CLIENTS,
                           num_classes=NUM_CLASSES, shots=0, seed=0)
    return load_federated_dataset(args)


def test_without_trust_the_script_refuses_and_changes_nothing(reference, tmp_path, file_bytes):
    before = file_bytes(reference.folder)
    result = subprocess.run([sys.executable, SCRIPT, str(reference.folder)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "unpickles", "runs any code", "--trust")
    assert file_bytes(reference.folder) == before


def test_trusted_conversion_loads_the_same_arrays_and_keeps_the_config(reference, capsys):
    (reference.folder / "rawdata").mkdir()
    (reference.folder / "rawdata" / "archive.bin").write_bytes(b"downloaded")
    assert fldata.reference.run([str(reference.folder), "--trust"]) == 0
    assert "converted 3 clients (18 train / 6 test samples)" in capsys.readouterr().out

    dataset = load(reference.folder)
    for client, data in enumerate(dataset.clients):
        for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
            expected_x, expected_y = reference.arrays[split, client]
            assert np.array_equal(x.numpy(), expected_x) and np.array_equal(y.numpy(), expected_y)
    assert dataset.image_shape == IMAGE_SHAPE

    original = json.loads(reference.config_bytes)
    config = dataset.config
    assert {key: config[key] for key in original} == json.loads(json.dumps(original))
    assert config["image_shape"] == list(IMAGE_SHAPE) and config["normalization"] == {"mean": 0.5, "std": 0.5}
    assert config["train_sizes"] == [6] * NUM_CLIENTS and config["test_sizes"] == [2] * NUM_CLIENTS
    assert config["conversion"]["original_config"] == "config-reference.json"
    assert (reference.folder / "config-reference.json").read_bytes() == reference.config_bytes
    with zipfile.ZipFile(reference.folder / "train" / "0.npz") as archive:
        assert sorted(archive.namelist()) == ["x.npy", "y.npy"]  # plain arrays, nothing pickled
    assert (reference.folder / "rawdata" / "archive.bin").read_bytes() == b"downloaded"
    assert os.listdir(reference.folder.parent) == [NAME]  # the staging folder is gone


def test_converted_folder_is_left_alone(reference, capsys, file_bytes):
    assert fldata.reference.run([str(reference.folder), "--trust"]) == 0
    converted = file_bytes(reference.folder)
    for flags in ([], ["--trust"]):
        assert fldata.reference.run([str(reference.folder), *flags]) == 0
        assert "already in this project's format" in capsys.readouterr().out
        assert file_bytes(reference.folder) == converted


def test_failure_midway_leaves_the_original(reference, monkeypatch, capsys, file_bytes, failing_from_call):
    before = file_bytes(reference.folder)
    monkeypatch.setattr(fldata.reference, "save_npz",
                        failing_from_call(fldata.reference.save_npz, 3, OSError("disk full")))
    assert fldata.reference.run([str(reference.folder), "--trust"]) == 2
    assert_one_line_error(capsys.readouterr().err, "disk full")
    assert file_bytes(reference.folder) == before
    assert os.listdir(reference.folder.parent) == [NAME]


def replace_client(split, client, x=None, y=None):
    """A damage: rewrites one client file in the reference format with x and/or y changed."""
    def damage(reference):
        original_x, original_y = reference.arrays[split, client]
        save_reference_file(reference.folder / split / f"{client}.npz",
                            original_x if x is None else x(original_x), original_y if y is None else y(original_y))
    return damage


@pytest.mark.parametrize("damage,fragment", [
    (lambda reference: os.remove(reference.folder / "config.json"), "has no config.json"),
    (lambda reference: os.remove(reference.folder / "test" / "2.npz"), "lacks 2.npz"),
    (replace_client("train", 1, x=lambda x: x.transpose(0, 2, 3, 1)), "channels first"),
    (replace_client("train", 1, x=lambda x: x * 127.5 + 127.5), "has x values in"),
    (replace_client("test", 2, y=lambda y: y + NUM_CLASSES), "num_classes=4"),
    (replace_client("train", 0, y=lambda y: y[:-1]), "expected 6 integer labels"),
])
def test_bad_folders_are_one_line_errors(reference, capsys, damage, fragment, file_bytes):
    damage(reference)
    before = file_bytes(reference.folder)
    assert fldata.reference.run([str(reference.folder), "--trust"]) == 2
    assert_one_line_error(capsys.readouterr().err, fragment)
    assert file_bytes(reference.folder) == before
    assert os.listdir(reference.folder.parent) == [NAME]


def test_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert fldata.reference.run([str(tmp_path / "nowhere"), "--trust"]) == 2
    assert_one_line_error(capsys.readouterr().err, "does not exist")


def test_loader_refusal_names_the_converter(reference):
    with pytest.raises(UserError) as refusal:
        load(reference.folder)
    message = str(refusal.value)
    assert "\n" not in message
    assert f"python dataset/convert_reference.py {reference.folder} --trust" in message
