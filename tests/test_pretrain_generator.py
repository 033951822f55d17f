"""stylegan/pretrain_generator.py and flcore/generators/pretrain.py: a DCGAN generator trained on a folder or an .npz
learns (the discriminator's margin grows), resumes bit for bit, is written in the layout -GPath reads, refuses bad
input in one line without touching a good file, and its quality scores say 'same' for real vs real and 'apart' for
real vs noise."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from flcore.errors import UserError
from flcore.generators.dcgan import DCGANGenerator, GaussianLatents, load_dcgan_checkpoint
from flcore.generators.pretrain import (
    PretrainSettings,
    load_images,
    pretrain,
    real_fake_scores,
    to_unit_range,
)
from flcore.generators.registry import resolve_generator
from flcore.paths import REPO_ROOT
from flutils import experiment

SCRIPT = os.path.join(REPO_ROOT, "stylegan", "pretrain_generator.py")
TINY = ["--steps", "8", "--batch_size", "16", "--width", "8", "--d_width", "8", "--quality_samples", "32",
        "--sample_every", "4", "--checkpoint_every", "4", "--quiet"]
FAST_KTL = ["FedKTL-stylegan-3", "-se", "3", "-sbs", "8"]


def structured_images(n, size=32, seed=0):
    """uint8 [n, size, size, 3]: a coloured disc of random centre, radius and colour on a vertical gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    images = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.3)
        background = (yy[..., None] * rng.uniform(0, 0.5, 3) + 0.1)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
        images.append(np.where(disc, rng.uniform(0.5, 1, 3), background))
    return (np.stack(images) * 255).round().astype(np.uint8)


def write_folder(folder, images):
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    for i, image in enumerate(images):
        # half of them one folder down: the search is recursive
        Image.fromarray(image).save(os.path.join(folder, "sub" if i % 2 else "", f"{i:03d}.png"))
    return folder


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "discs.npz")
    np.savez(path, x=structured_images(64), y=np.zeros(64))
    return path


def tiny(tmp_path, images, **changes):
    return replace(PretrainSettings(images=images, out=str(tmp_path / "g.pt"), steps=6, batch_size=16, width=8,
                                    d_width=8, quality_samples=32, sample_every=0, checkpoint_every=0), **changes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The command line run on a folder of png images: (its completed process, --out)."""
    folder = tmp_path_factory.mktemp("trained")
    images = write_folder(str(folder / "images"), structured_images(64, seed=1))
    out = str(folder / "gen.pt")
    done = subprocess.run([sys.executable, SCRIPT, "--images", images, "--out", out, "-dev", "cpu", "--num_threads",
                           "1", *TINY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done, out


def test_the_command_line_writes_the_generator_its_checkpoint_samples_and_scores(trained):
    done, out = trained
    assert sorted(os.listdir(out + ".samples")) == ["step_000004.png", "step_000008.png"]
    with Image.open(out + ".samples/step_000008.png") as grid:
        assert grid.size == (8 * 34 + 2, 8 * 34 + 2) and grid.mode == "RGB"
    quality = json.load(open(out + ".quality.json"))
    assert quality["steps"] == 8 and quality["samples"] == 32 and 0.5 <= quality["probe_accuracy"] <= 1
    assert f"{quality['probe_accuracy']:.3f}" in done.stdout and "step_000008.png" in done.stdout
    checkpoint = torch.load(out + ".ckpt", weights_only=True)
    assert checkpoint["trainer"]["step"] == 8
    assert not [name for name in os.listdir(os.path.dirname(out)) if name.endswith(".tmp")]


def test_the_written_file_is_the_dcgan_layout_and_renders_32_px_images(trained):
    _, out = trained
    assert list(torch.load(out, weights_only=True)) == ["netG_state_dict"]
    G = load_dcgan_checkpoint(out)
    assert (G.z_dim, G.widths, G.img_resolution, G.img_channels) == (100, (32, 16, 8), 32, 3)
    images = G(torch.randn(4, 100))
    assert images.shape == (4, 3, 32, 32) and images.abs().max() <= 1
    assert images.std() > 0.05, "BatchNorm statistics re-estimated for the EMA weights, not left empty"


def test_fedktl_loads_it_through_gpath_and_renders_the_clients_shape(trained, make_server, round_timer, small_run):
    _, out = trained
    server = make_server(*FAST_KTL, "-GPath", out)
    settings = server.algorithm.settings
    assert resolve_generator("auto", out, settings.auto_generators, settings.auto_without_path) == "dcgan"
    assert isinstance(server.algorithm.image_generator, GaussianLatents)
    server.exchange(server.clients, round_timer(server))
    images = server.algorithm.pair_images
    assert tuple(images.shape[1:]) == tuple(server.algorithm.context.image_shape) and torch.isfinite(images).all()
    assert experiment.main(small_run("-algo", *FAST_KTL, "-gr", "1", "-gen", "dcgan", "-GPath", out,
                                     "--image_every", "0")) == 0


def test_an_existing_out_is_one_error_line_and_left_as_it_was(trained, tmp_path):
    _, out = trained
    before = open(out, "rb").read()
    done = subprocess.run([sys.executable, SCRIPT, "--images", str(tmp_path), "--out", out, *TINY],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {out} exists; pass --resume to continue that run or --force "
                                                f"to overwrite it"]
    assert open(out, "rb").read() == before


def test_training_widens_the_discriminators_margin_and_lowers_its_loss(tmp_path, data_npz):
    history = pretrain(tiny(tmp_path, data_npz, steps=20), progress=False)["history"]
    d_losses, _, margins = zip(*history)
    assert d_losses[0] == pytest.approx(2.0, abs=0.1), "hinge loss with scores near 0 at the start"
    assert np.mean(d_losses[-5:]) < d_losses[0] - 0.25
    assert np.mean(margins[-5:]) > margins[0] + 0.25


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, data_npz, assert_same_state):
    straight = tiny(tmp_path / "straight", data_npz, sample_every=3)
    pretrain(straight, progress=False)
    split = tiny(tmp_path / "split", data_npz, sample_every=3)
    pretrain(replace(split, steps=3), progress=False)
    torch.manual_seed(123)   # a session that starts elsewhere: the checkpoint brings every RNG back
    result = pretrain(replace(split, resume=True), progress=False)
    assert result["steps"] == 6 and len(result["history"]) == 3

    def read(settings, name):
        return open(settings.out + name, "rb").read()
    assert read(split, "") == read(straight, "")
    assert read(split, ".samples/step_000006.png") == read(straight, ".samples/step_000006.png")
    assert_same_state(torch.load(split.out + ".ckpt", weights_only=True)["trainer"],
                      torch.load(straight.out + ".ckpt", weights_only=True)["trainer"])


@pytest.mark.parametrize("change,fragment", [
    ({"width": 16}, "different width"),
    ({"size": 64}, "different data, shape, size"),
    ("other data", "different data")])
def test_resuming_another_runs_checkpoint_is_refused(tmp_path, data_npz, change, fragment):
    settings = tiny(tmp_path, data_npz, steps=2)
    pretrain(settings, progress=False)
    before = open(settings.out, "rb").read()
    if change == "other data":
        other = str(tmp_path / "other.npz")
        np.savez(other, x=structured_images(64, seed=5))
        change = {"images": other}
    with pytest.raises(UserError, match=f"was written by another run \\({fragment}\\)"):
        pretrain(replace(settings, resume=True, steps=4, **change), progress=False)
    assert open(settings.out, "rb").read() == before


def test_force_starts_over_and_resume_needs_a_checkpoint(tmp_path, data_npz):
    settings = tiny(tmp_path, data_npz, steps=2)
    with pytest.raises(UserError, match="no checkpoint at .*drop --resume"):
        pretrain(replace(settings, resume=True), progress=False)
    assert not os.path.exists(settings.out)
    pretrain(settings, progress=False)
    os.remove(settings.out)   # a run killed after its first checkpoint: that checkpoint is a good file too
    with pytest.raises(UserError, match=r"g\.pt\.ckpt exists; pass --resume"):
        pretrain(settings, progress=False)
    assert pretrain(replace(settings, force=True, steps=1), progress=False)["steps"] == 1
    assert os.listdir(settings.out + ".samples") == ["step_000001.png"], "the earlier run's grids are gone"


def test_bad_image_folders_and_files_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    mixed = write_folder(str(tmp_path / "mixed"), structured_images(8))
    Image.fromarray(structured_images(1, size=28)[0]).save(os.path.join(mixed, "small.png"))
    broken = write_folder(str(tmp_path / "broken"), structured_images(8))
    open(os.path.join(broken, "bad.png"), "wb").write(b"not a png")
    np.savez(tmp_path / "nox.npz", images=structured_images(8))
    np.savez(tmp_path / "float.npz", x=structured_images(8).astype(np.float32))
    cases = [(str(empty), "no png/jpg images in"),
             (mixed, r"images of mixed sizes in .*: 000\.png is 32x32, small\.png is 28x28; resize them"),
             (broken, r"cannot read image .*bad\.png"),
             (str(tmp_path / "nox.npz"), "has no key 'x' \\(it has: images\\)"),
             (str(tmp_path / "float.npz"), "'x' is float32 of shape"),
             (str(tmp_path / "missing"), "neither a folder"),
             (write_folder(str(tmp_path / "few"), structured_images(3)), "only 3 images")]
    for path, fragment in cases:
        with pytest.raises(UserError, match=fragment) as raised:
            load_images(path, 32)
        assert "\n" not in str(raised.value)


def test_images_of_another_size_are_resized_and_grayscale_npz_keeps_one_channel(tmp_path):
    np.savez(tmp_path / "gray.npz", x=structured_images(8, size=28)[..., 0])
    images = load_images(str(tmp_path / "gray.npz"), 64)
    assert images.shape == (8, 1, 64, 64) and images.dtype == torch.uint8
    folder = write_folder(str(tmp_path / "f"), structured_images(8))
    in_path_order = structured_images(8)[[0, 2, 4, 6, 1, 3, 5, 7]]   # f/000.png ... f/006.png, then f/sub/...
    assert torch.equal(load_images(folder, 32), torch.from_numpy(in_path_order).permute(0, 3, 1, 2))


def test_a_grayscale_run_at_64_px_writes_a_one_channel_64_px_generator(tmp_path):
    np.savez(tmp_path / "gray.npz", x=structured_images(16)[..., 1])
    settings = tiny(tmp_path, str(tmp_path / "gray.npz"), size=64, steps=1)
    pretrain(settings, progress=False)
    G = load_dcgan_checkpoint(settings.out)
    assert isinstance(G, DCGANGenerator) and (G.img_resolution, G.img_channels) == (64, 1)


def test_quality_scores_say_same_for_real_vs_real_and_apart_for_noise():
    real = to_unit_range(torch.from_numpy(structured_images(600, seed=3)).permute(0, 3, 1, 2))
    same = real_fake_scores(real[:300], real[300:])
    assert abs(same["probe_accuracy"] - 0.5) < 0.1 and same["recall"] > 0.8 and same["precision"] > 0.8
    noise = torch.rand(300, 3, 32, 32) * 2 - 1
    apart = real_fake_scores(real[:300], noise)
    assert apart["probe_accuracy"] > 0.95 and apart["recall"] < 0.05 and apart["precision"] < 0.05
    blurred = torch.nn.functional.avg_pool2d(real[300:], 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    between = real_fake_scores(real[:300], blurred)   # a worse imitation than real, a better one than noise
    assert between["probe_accuracy"] > same["probe_accuracy"] + 0.2
    assert apart["recall"] + 0.3 < between["recall"] < same["recall"] - 0.1


@pytest.mark.parametrize("change,fragment", [
    ({"resume": True, "force": True}, "give one of them"),
    ({"size": 48}, "--size 48 is not supported"),
    ({"loss": "wgan"}, "--loss wgan is not supported"),
    ({"ema": 1.0}, r"--ema must lie in \[0, 1\)"),
    ({"quality_samples": 4}, "--quality_samples must be at least 8"),
    ({"sample_every": -1}, "--sample_every must be 0 \\(never\\) or more")])
def test_bad_settings_are_refused_before_anything_is_read_or_written(tmp_path, change, fragment):
    settings = tiny(tmp_path, str(tmp_path / "missing.npz"), **change)
    with pytest.raises(UserError, match=fragment):
        pretrain(settings, progress=False)
    assert os.listdir(tmp_path) == []
