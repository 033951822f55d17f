"""The dataset/generate_*.py scripts end to end: files, config, re-runs, atomicity, --root layouts, CLI errors."""
import dataclasses
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

import fldata.dataset_io
from fldata.cli import DATASET_DIR, GenerationOptions, build_parser, run
from fldata.dataset_io import LABEL_STATS_KEY
from fldata.errors import DatasetError
from fldata.sources import CIFAR10, DIGITS, MNIST, TINY_IMAGENET, load_source

NUM_DIGITS = 1797
CONFIG_KEYS = {"dataset", "num_clients", "num_classes", "partition", "alpha", "class_per_client", "balance",
               "train_ratio", "seed", "image_shape", "normalization", "train_sizes", "test_sizes", LABEL_STATS_KEY,
               "params"}


def generate(spec, out, *flags):
    return run(spec, ["--out", str(out), *flags])


def read_config(out):
    with open(os.path.join(out, "config.json"), encoding="utf-8") as file:
        return json.load(file)


def read_client(out, split, client):
    with np.load(os.path.join(out, split, f"{client}.npz")) as archive:  # allow_pickle stays False
        return archive["x"], archive["y"]


def mtimes(out, file_bytes):
    return {path: os.stat(os.path.join(out, path)).st_mtime_ns for path in file_bytes(out)}


def pixels(x):
    """Normalized float images back to 0..255."""
    return (x + 1) * 127.5


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory):
    """Digits over 5 clients with the default dir partition, generated once for read-only checks."""
    out = tmp_path_factory.mktemp("digits") / "Digits"
    assert generate(DIGITS, out, "--num-clients", "5") == 0
    return out


def test_config_matches_the_npz_files(digits_out):
    config = read_config(digits_out)
    assert CONFIG_KEYS <= set(config)
    assert (config["dataset"], config["num_clients"], config["num_classes"]) == ("Digits", 5, 10)
    defaults = GenerationOptions()  # the options not given on the command line
    assert (config["partition"], config["alpha"], config["seed"], config["balance"]) == \
        (defaults.partition, defaults.alpha, defaults.seed, defaults.balance)
    assert config["image_shape"] == [3, 32, 32]
    assert config["normalization"] == {"mean": 0.5, "std": 0.5}
    assert config["params"]["num_clients"] == 5 and config["params"]["source"] == "built-in Digits data"
    total = 0
    for client in range(5):
        train_x, train_y = read_client(digits_out, "train", client)
        test_x, test_y = read_client(digits_out, "test", client)
        assert train_x.dtype == np.float32 and train_y.dtype == np.int64
        assert train_x.shape == (config["train_sizes"][client], 3, 32, 32)
        assert test_x.shape == (config["test_sizes"][client], 3, 32, 32)
        assert len(train_y) >= 1 and len(test_y) >= 1
        classes, counts = np.unique(np.concatenate([train_y, test_y]), return_counts=True)
        assert config[LABEL_STATS_KEY][client] == [[int(c), int(n)] for c, n in zip(classes, counts)]
        total += len(train_y) + len(test_y)
    assert total == NUM_DIGITS


def test_images_are_normalized_to_minus_one_one(digits_out):
    x, y = read_client(digits_out, "train", 0)
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.allclose(pixels(x), np.round(pixels(x)), atol=1e-4)  # (pixel / 255 - 0.5) / 0.5 of uint8 pixels
    assert np.array_equal(x[:, 0], x[:, 2])  # grayscale digits repeated over RGB


def test_train_ratio_is_three_quarters_per_client(digits_out):
    config = read_config(digits_out)
    for train, test in zip(config["train_sizes"], config["test_sizes"]):
        assert train == int(0.75 * (train + test))
    assert 0.74 < sum(config["train_sizes"]) / NUM_DIGITS < 0.76


def test_dataset_folder_follows_the_umask(digits_out):
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(digits_out).st_mode & 0o777 == 0o777 & ~umask


def test_archives_hold_plain_arrays(digits_out):
    with zipfile.ZipFile(os.path.join(digits_out, "train", "0.npz")) as archive:
        assert sorted(archive.namelist()) == ["x.npy", "y.npy"]
        assert {member.date_time for member in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path, file_bytes):
    flags = ("--num-clients", "4", "--partition", "pat", "--seed", "7")
    assert generate(DIGITS, tmp_path / "a", *flags) == 0
    assert generate(DIGITS, tmp_path / "b", *flags) == 0
    first = file_bytes(tmp_path / "a")
    assert len(first) == 9 and first == file_bytes(tmp_path / "b")
    assert generate(DIGITS, tmp_path / "c", *flags[:-1], "8") == 0
    assert file_bytes(tmp_path / "c")["train/0.npz"] != first["train/0.npz"]


def test_identical_rerun_is_skipped_and_changed_params_regenerate(tmp_path, capsys, file_bytes):
    out = tmp_path / "Digits"
    assert generate(DIGITS, out, "--num-clients", "4", "--partition", "iid") == 0
    before, contents = mtimes(out, file_bytes), file_bytes(out)
    capsys.readouterr()
    assert generate(DIGITS, out, "--num-clients", "4", "--partition", "iid") == 0
    assert "up to date" in capsys.readouterr().out
    assert mtimes(out, file_bytes) == before
    assert generate(DIGITS, out, "--num-clients", "4", "--partition", "iid", "--balance", "1") == 0
    assert "wrote 4 clients" in capsys.readouterr().out
    config = read_config(out)
    assert config["balance"] is True and config["params"]["balance"] is True
    assert file_bytes(out)["train/0.npz"] != contents["train/0.npz"]
    sizes = [train + test for train, test in zip(config["train_sizes"], config["test_sizes"])]
    assert max(sizes) - min(sizes) <= 1


def test_missing_client_file_regenerates(tmp_path):
    out = tmp_path / "Digits"
    assert generate(DIGITS, out, "--num-clients", "4", "--partition", "iid") == 0
    os.remove(out / "test" / "3.npz")
    assert generate(DIGITS, out, "--num-clients", "4", "--partition", "iid") == 0
    assert (out / "test" / "3.npz").is_file()


def test_failed_generation_leaves_the_dataset_untouched(tmp_path, monkeypatch, error_line, file_bytes,
                                                         failing_from_call):
    out = tmp_path / "Digits"
    assert generate(DIGITS, out, "--num-clients", "4", "--partition", "iid") == 0
    before = file_bytes(out)
    monkeypatch.setattr(fldata.dataset_io, "save_npz",
                        failing_from_call(fldata.dataset_io.save_npz, 3, OSError("disk full")))
    assert "disk full" in error_line(generate, DIGITS, out, "--num-clients", "4", "--partition", "iid", "--seed", "2")
    assert file_bytes(out) == before
    assert sorted(os.listdir(tmp_path)) == ["Digits"]  # the staging folder is gone


def test_failed_partition_leaves_the_dataset_untouched(tmp_path, error_line, file_bytes):
    out = tmp_path / "Digits"
    assert generate(DIGITS, out, "--num-clients", "4", "--partition", "iid") == 0
    before = file_bytes(out)
    line = error_line(generate, DIGITS, out, "--num-clients", "900", "--partition", "iid", "--balance", "1")
    assert "lower --num-clients or change --train-ratio" in line
    assert file_bytes(out) == before


def test_regeneration_keeps_rawdata_and_refuses_foreign_folders(tmp_path, error_line):
    out = tmp_path / "Digits"
    assert generate(DIGITS, out, "--num-clients", "4") == 0
    (out / "rawdata").mkdir()
    (out / "rawdata" / "archive.bin").write_bytes(b"downloaded")
    assert generate(DIGITS, out, "--num-clients", "5") == 0
    assert (out / "rawdata" / "archive.bin").read_bytes() == b"downloaded"
    assert read_config(out)["num_clients"] == 5

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    assert "pass a new or empty folder" in error_line(generate, DIGITS, foreign, "--num-clients", "4")
    assert os.listdir(foreign) == ["todo.txt"]


CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def class_color(label):
    return (20 * label + 10, 250 - 20 * label, 128)


def test_root_image_folder(tmp_path):
    root = tmp_path / "images"
    for name in CLASS_NAMES:
        folder = root / name
        folder.mkdir(parents=True)
        color = class_color(sorted(CLASS_NAMES).index(name))  # labels follow sorted folder names
        for k, extension in enumerate(["png", "png", "bmp", "PNG"]):
            Image.new("RGB", (12, 10), color).save(folder / f"img{k}.{extension}",
                                                   format="BMP" if extension == "bmp" else "PNG")
        (folder / "README.txt").write_text("not an image")
    out = tmp_path / "out"
    assert generate(DIGITS, out, "--root", str(root), "--partition", "iid", "--num-clients", "4",
                    "--balance", "1") == 0
    config = read_config(out)
    assert [a + b for a, b in zip(config["train_sizes"], config["test_sizes"])] == [10, 10, 10, 10]
    assert config["params"]["source"] == str(root)
    for client in range(4):
        for split in ("train", "test"):
            x, y = read_client(out, split, client)
            assert x.shape[1:] == (3, 32, 32)
            for image, label in zip(x, y):
                assert np.allclose(pixels(image[:, 0, 0]), class_color(label), atol=0.01)
                assert np.allclose(image, image[:, :1, :1], atol=1e-6)  # resizing keeps a flat color flat


def test_root_folder_with_wrong_class_count_is_rejected(tmp_path, error_line):
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")
    assert "has 2 class folders, Digits needs 10" in error_line(generate, DIGITS, tmp_path / "out", "--root", str(root))
    assert not (tmp_path / "out").exists()


def write_tiny_imagenet(base, val_wnids):
    """A fake extracted Tiny-ImageNet; each class's images have their own gray level."""
    wnids = ["n03", "n01", "n02"]  # not sorted on purpose: labels follow sorted order
    level = {wnid: 40 + 80 * sorted(wnids).index(wnid) for wnid in wnids}
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        (base / "train" / wnid / "images").mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(2):
            Image.new("RGB", (64, 64), (level[wnid],) * 3).save(base / "train" / wnid / "images" / f"{wnid}_{k}.JPEG",
                                                                 format="JPEG")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for k, wnid in enumerate(val_wnids):
        Image.new("L", (64, 64), level[wnid]).save(base / "val" / "images" / f"val_{k}.JPEG", format="JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return level


@pytest.mark.parametrize("point_at_parent", [True, False])
def test_tiny_imagenet_layout_labels_validation_images_from_annotations(tmp_path, point_at_parent):
    val_wnids = ["n02", "n03", "n03", "n01", "n02"]
    level = write_tiny_imagenet(tmp_path / "tiny-imagenet-200", val_wnids)
    spec = dataclasses.replace(TINY_IMAGENET, num_classes=3)
    root = tmp_path if point_at_parent else tmp_path / "tiny-imagenet-200"
    x, y = load_source(spec, str(root), download=False)
    assert x.shape == (11, 64, 64, 3) and x.dtype == np.uint8
    label_of = {wnid: sorted(level).index(wnid) for wnid in level}
    assert y.tolist() == [0, 0, 1, 1, 2, 2] + [label_of[wnid] for wnid in val_wnids]
    assert y[6:].tolist() == [1, 2, 2, 0, 1]  # not all zero: labels come from val_annotations.txt
    for image, label in zip(x, y):
        assert abs(float(image.mean()) - (40 + 80 * label)) < 3


def test_tiny_imagenet_unlabelled_validation_image_is_an_error(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    write_tiny_imagenet(base, ["n01"])
    Image.new("RGB", (64, 64)).save(base / "val" / "images" / "val_9.JPEG", format="JPEG")
    with pytest.raises(DatasetError, match="val_annotations.txt has no label for val_9.JPEG"):
        load_source(dataclasses.replace(TINY_IMAGENET, num_classes=3), str(tmp_path), download=False)


def test_npz_roots_for_rgb_and_grayscale_scripts(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20).astype(np.uint8)
    rgb = tmp_path / "cifar.npz"
    np.savez_compressed(rgb, x=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), y=labels)
    assert generate(CIFAR10, tmp_path / "c10", "--root", str(rgb), "--partition", "pat",
                    "--num-clients", "5") == 0
    config = read_config(tmp_path / "c10")
    assert config["image_shape"] == [3, 32, 32] and config["dataset"] == "Cifar10"
    assert sum(config["train_sizes"]) + sum(config["test_sizes"]) == 200
    assert all(len(counts) == 2 for counts in config[LABEL_STATS_KEY])

    gray = tmp_path / "mnist.npz"
    np.savez(gray, x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), y=labels)
    assert generate(MNIST, tmp_path / "mnist", "--root", str(gray), "--partition", "iid",
                    "--num-clients", "4") == 0
    x, _ = read_client(tmp_path / "mnist", "train", 0)
    assert read_config(tmp_path / "mnist")["image_shape"] == [1, 28, 28] and x.shape[1:] == (1, 28, 28)

    small = tmp_path / "small.npz"  # 16x16 gray is resized and repeated to Digits' 3x32x32
    np.savez(small, x=np.full((40, 16, 16), 255, np.uint8), y=np.repeat(np.arange(10), 4))
    assert generate(DIGITS, tmp_path / "digits", "--root", str(small), "--partition", "iid",
                    "--num-clients", "4") == 0
    x, _ = read_client(tmp_path / "digits", "train", 0)
    assert x.shape[1:] == (3, 32, 32) and np.all(x == 1.0)


def test_image_size_resizes_and_a_new_size_regenerates(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "tiny.npz"  # Tiny-ImageNet's own size is 64; a 32 px copy stays 32 px with --image-size 32
    np.savez(source, x=rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8), y=np.repeat(np.arange(200), 2))
    out = tmp_path / "tiny"
    assert generate(TINY_IMAGENET, out, "--root", str(source), "--partition", "iid", "--num-clients", "2",
                    "--image-size", "32") == 0
    x, _ = read_client(out, "train", 0)
    assert read_config(out)["image_shape"] == [3, 32, 32] and x.shape[1:] == (3, 32, 32)
    with np.load(source) as archive:  # no resampling at the source's own size: the pixels come back exactly
        pooled = {bytes(image.tobytes()) for image in archive["x"]}
    assert bytes(np.round(pixels(x[0])).astype(np.uint8).transpose(1, 2, 0).tobytes()) in pooled
    assert generate(TINY_IMAGENET, out, "--root", str(source), "--partition", "iid", "--num-clients", "2",
                    "--image-size", "16") == 0
    assert read_config(out)["image_shape"] == [3, 16, 16] and read_client(out, "test", 1)[0].shape[1:] == (3, 16, 16)


@pytest.mark.parametrize("arrays,fragment", [
    ({"x": np.zeros((20, 8, 8), np.uint8)}, "must hold arrays 'x'"),
    ({"x": np.zeros((20, 8, 8), np.float32), "y": np.zeros(20, np.int64)}, "images must be uint8"),
    ({"x": np.zeros((20, 8, 8), np.uint8), "y": np.full(20, 10)}, "Digits needs 0..9"),
    ({"x": np.zeros((20, 8, 8), np.uint8), "y": np.zeros(19, np.int64)}, "labels must be 20 integers"),
])
def test_bad_npz_roots(tmp_path, error_line, arrays, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    assert fragment in error_line(generate, DIGITS, tmp_path / "out", "--root", str(path))


def write_idx(path, array):
    """The MNIST idx format: zero, zero, dtype code 0x08 (uint8), number of dimensions, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_root_in_torchvision_mnist_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", 20), ("t10k", 10)):
        labels = np.arange(count) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.repeat(labels * 25, 28 * 28).reshape(count, 28, 28))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    out = tmp_path / "out"
    assert generate(MNIST, out, "--root", str(tmp_path), "--partition", "iid", "--num-clients", "2") == 0
    assert sum(read_config(out)["train_sizes"]) + sum(read_config(out)["test_sizes"]) == 30
    x, y = read_client(out, "train", 0)
    assert np.allclose(pixels(x[:, 0, 0, 0]), y * 25, atol=0.01)


def test_default_output_is_next_to_the_scripts():
    assert os.path.isfile(os.path.join(DATASET_DIR, "generate_Digits.py"))
    help_text = " ".join(build_parser(DIGITS).format_help().split())
    assert os.path.join(DATASET_DIR, "Digits") in help_text.replace(" ", "")
    assert "--download" not in help_text  # Digits needs none


@pytest.mark.parametrize("spec,flags,fragment", [
    (DIGITS, ["--num-clients", "0"], "--num-clients must be >= 1"),
    (DIGITS, ["--alpha", "-1"], "--alpha must be a positive number"),
    (DIGITS, ["--balance", "maybe"], "argument --balance: expected 0/1/true/false"),
    (DIGITS, ["--partition", "noniid"], "argument --partition: invalid choice"),
    (DIGITS, ["--train-ratio", "1"], "--train-ratio must be in (0, 1)"),
    (DIGITS, ["--partition", "pat", "--class-per-client", "11"], "--class-per-client must be in [1, 10]"),
    (DIGITS, ["--root", "missing"], "--root missing does not exist"),
    (DIGITS, ["--num-clients", "100", "--alpha", "0.01"], "raise --alpha or lower --num-clients"),
    (DIGITS, ["--image-size", "4"], "--image-size must be in [8, 512]"),
    (CIFAR10, [], "pass --download to fetch them, or --root"),
], ids=lambda value: getattr(value, "name", None))
def test_cli_bad_inputs(tmp_path, monkeypatch, error_line, spec, flags, fragment):
    monkeypatch.chdir(tmp_path)  # relative --out and --root, as typed in a shell
    assert fragment in error_line(run, spec, ["--out", "out", *flags])
    assert not (tmp_path / "out").exists()


def test_script_runs_from_any_directory(tmp_path):
    """The one run of a generate_*.py script as a process (the other tests call its main in-process)."""
    result = subprocess.run([sys.executable, os.path.join(DATASET_DIR, "generate_Digits.py"), "--num-clients", "4",
                             "--partition", "exdir", "--alpha", "1", "--class-per-client", "3", "--out", "relative"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 4 clients" in result.stdout
    config = read_config(tmp_path / "relative")
    assert config["partition"] == "exdir"
    assert all(len(counts) <= 3 for counts in config[LABEL_STATS_KEY])
