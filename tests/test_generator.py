import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compact_stylegan
from compact_stylegan import CompactGenerator, build_default_generator, modulated_conv2d
from generator_io import GeneratorLoadError, load_generator_pickle, save_generator_pickle

STYLEGAN_DIR = os.path.dirname(os.path.abspath(compact_stylegan.__file__))
SMALL = dict(z_dim=32, w_dim=32)


def small_generator(seed=0, **kwargs):
    torch.manual_seed(seed)
    return CompactGenerator(**{**SMALL, **kwargs})


# ---- shapes and interface --------------------------------------------------------------------

@pytest.mark.parametrize("resolution, channels, expected_num_ws",
                         [(8, 1, 5), (8, 3, 5), (32, 1, 11), (32, 3, 11), (64, 3, 14)])
def test_shapes_and_num_ws(resolution, channels, expected_num_ws):
    G = small_generator(img_resolution=resolution, img_channels=channels)
    assert (G.z_dim, G.w_dim, G.c_dim, G.num_ws) == (32, 32, 0, expected_num_ws)
    assert (G.img_resolution, G.img_channels) == (resolution, channels)
    assert G.mapping.w_avg.shape == (32,)
    z = torch.randn(3, 32)
    ws = G.mapping(z, None)
    assert ws.shape == (3, expected_num_ws, 32)
    img = G.synthesis(ws, noise_mode="const")
    assert img.shape == (3, channels, resolution, resolution) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    assert torch.equal(G(z, None), img)


def test_untrained_images_are_mostly_in_minus_one_to_one_and_differ_per_latent():
    G = small_generator(img_resolution=32)
    with torch.no_grad():
        img = G(torch.randn(64, 32))
    assert 0.15 < img.std() < 0.7
    assert (img.abs() > 1).float().mean() < 0.05
    assert img.std(dim=0).mean() > 0.1  # different latents give different images


def test_all_ws_entries_are_the_same_w_without_truncation():
    G = small_generator()
    ws = G.mapping(torch.randn(4, 32))
    assert torch.equal(ws, ws[:, :1].expand_as(ws))


@pytest.mark.parametrize("client_size, expected", [(1, 8), (8, 8), (28, 32), (32, 32), (33, 64), (64, 64)])
def test_default_generator_covers_the_client_image_size(client_size, expected):
    torch.manual_seed(0)
    G = build_default_generator(client_size, 1, c_dim=3, w_dim=64)
    assert (G.img_resolution, G.img_channels, G.c_dim, G.w_dim, G.z_dim) == (expected, 1, 3, 64, 64)


@pytest.mark.parametrize("resolution", [0, 4, 24, 48])
def test_resolution_must_be_a_power_of_two_of_at_least_8(resolution):
    with pytest.raises(ValueError, match="power of two >= 8"):
        CompactGenerator(img_resolution=resolution)


def test_invalid_sizes_are_rejected_with_the_name_of_the_argument():
    with pytest.raises(ValueError, match="img_resolution must be >= 1"):
        build_default_generator(0, 3)
    with pytest.raises(ValueError, match="img_channels must be >= 1"):
        CompactGenerator(img_channels=0)
    with pytest.raises(ValueError, match="channel_base must be >= 64"):
        CompactGenerator(img_resolution=64, channel_base=32)


def test_wrong_latent_shapes_are_explained():
    G = small_generator()
    with pytest.raises(ValueError, match=r"z must have shape \[batch, 32\]"):
        G.mapping(torch.randn(2, 31))
    with pytest.raises(ValueError, match=r"repeat a w"):
        G.synthesis(torch.randn(2, 32))
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(G.mapping(torch.randn(2, 32)), noise_mode="fixed")


def test_initialisation_follows_the_global_rng():
    first, second, other = small_generator(5), small_generator(5), small_generator(6)
    z = torch.randn(2, 32)
    assert torch.equal(first(z), second(z))
    assert not torch.allclose(first(z), other(z))


# ---- conditioning ----------------------------------------------------------------------------

def test_conditional_generator_requires_c_and_c_changes_ws():
    G = small_generator(c_dim=5, img_resolution=8)
    z = torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"c_dim=5.*\[batch, 5\]"):
        G.mapping(z, None)
    with pytest.raises(ValueError, match=r"c must have shape \[2, 5\]"):
        G.mapping(z, torch.zeros(2, 4))
    first = G.mapping(z, F.one_hot(torch.tensor([0, 0]), 5).float())
    second = G.mapping(z, F.one_hot(torch.tensor([3, 3]), 5).float())
    assert first.shape == (2, G.num_ws, 32)
    assert (first - second).abs().max() > 1e-3
    assert G(z, F.one_hot(torch.tensor([1, 2]), 5).float()).shape == (2, 3, 8, 8)


def test_unconditional_generator_accepts_nvidias_empty_label():
    G = small_generator(img_resolution=8)
    z = torch.randn(2, 32)
    assert torch.equal(G.mapping(z, torch.zeros(2, 0)), G.mapping(z, None))


# ---- noise -----------------------------------------------------------------------------------

def test_noise_modes():
    G = small_generator(img_resolution=16)
    ws = G.mapping(torch.randn(2, 32))
    const = G.synthesis(ws, noise_mode="const")
    assert torch.equal(const, G.synthesis(ws, noise_mode="const"))
    first_random = G.synthesis(ws, noise_mode="random")
    assert (first_random - G.synthesis(ws, noise_mode="random")).abs().max() > 1e-4
    no_noise = G.synthesis(ws, noise_mode="none")
    assert torch.equal(no_noise, G.synthesis(ws, noise_mode="none"))
    assert (no_noise - const).abs().max() > 1e-4


# ---- truncation and w_avg --------------------------------------------------------------------

def test_w_avg_estimates_the_mean_mapped_latent():
    G = small_generator()
    with torch.no_grad():
        w = G.mapping(torch.randn(20000, 32))[:, 0]
    mean = w.mean(dim=0)
    spread = (w - mean).norm(dim=1).mean()
    assert mean.norm() > 0.1 * spread  # a zero w_avg would fail the next line
    assert (G.mapping.w_avg - mean).norm() < 0.05 * spread


def test_truncation_moves_ws_toward_w_avg():
    G = small_generator()
    z = torch.randn(3, 32)
    ws = G.mapping(z)
    assert torch.allclose(G.mapping(z, truncation_psi=0), G.mapping.w_avg.expand_as(ws), atol=1e-6)
    halfway = G.mapping.w_avg + 0.5 * (ws - G.mapping.w_avg)
    assert torch.allclose(G.mapping(z, truncation_psi=0.5), halfway, atol=1e-6)
    cut = G.mapping(z, truncation_psi=0, truncation_cutoff=4)
    assert torch.allclose(cut[:, :4], G.mapping.w_avg.expand(3, 4, 32), atol=1e-6)
    assert torch.equal(cut[:, 4:], ws[:, 4:])


def test_update_emas_moves_w_avg_toward_the_batch_mean():
    G = small_generator()
    before = G.mapping.w_avg.clone()
    z = torch.randn(8, 32)
    batch_mean = G.mapping(z)[:, 0].mean(dim=0).detach()
    G.mapping(z, update_emas=True)
    expected = before + (1 - compact_stylegan.W_AVG_BETA) * (batch_mean - before)
    assert torch.allclose(G.mapping.w_avg, expected, atol=1e-6)
    assert not torch.equal(G.mapping.w_avg, before)


# ---- modulated convolution and activation scale ----------------------------------------------

@pytest.mark.parametrize("demodulate", [True, False])
def test_grouped_modulated_conv_matches_a_per_sample_convolution(demodulate):
    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(3, 4)
    expected = []
    for sample, style in zip(x, styles):
        kernel = weight * style.reshape(1, 4, 1, 1)
        if demodulate:
            kernel = kernel / kernel.flatten(1).norm(dim=1).reshape(5, 1, 1, 1)
        expected.append(F.conv2d(sample.unsqueeze(0), kernel, padding=1))
    result = modulated_conv2d(x, weight, styles, demodulate=demodulate)
    assert torch.allclose(result, torch.cat(expected), atol=1e-5)


def test_demodulation_makes_the_output_independent_of_the_style_scale():
    torch.manual_seed(0)
    x, weight, styles = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3), torch.randn(2, 4)
    scale = torch.tensor([[7.0], [0.01]])
    assert torch.allclose(modulated_conv2d(x, weight, styles * scale), modulated_conv2d(x, weight, styles),
                          atol=1e-5)
    assert torch.allclose(modulated_conv2d(x, weight, styles * scale, demodulate=False)[0],
                          7 * modulated_conv2d(x, weight, styles, demodulate=False)[0], atol=1e-4)


@pytest.mark.parametrize("ws_scale", [0.1, 1.0, 10.0])
def test_activations_stay_unit_scale_through_every_layer(ws_scale):
    G = small_generator(img_resolution=64)
    rms = []
    hooks = [module.register_forward_hook(lambda module, inputs, out: rms.append(out.square().mean().sqrt()))
             for module in G.modules() if isinstance(module, compact_stylegan.StyleConv)]
    with torch.no_grad():
        G.synthesis(G.mapping(torch.randn(8, 32)) * ws_scale)
    for hook in hooks:
        hook.remove()
    assert len(rms) == 9
    assert all(0.3 < value < 3 for value in rms), rms


def test_gradients_reach_every_ws_entry():
    G = small_generator(img_resolution=16)
    ws = G.mapping(torch.randn(2, 32)).detach().requires_grad_(True)
    G.synthesis(ws).square().mean().backward()
    assert torch.isfinite(ws.grad).all()
    assert (ws.grad.norm(dim=2) > 0).all()  # every style input consumes its own ws entry


# ---- save / load -----------------------------------------------------------------------------

def test_pickle_round_trip_in_a_fresh_interpreter(tmp_path):
    G = small_generator(img_resolution=16, img_channels=1)
    path = tmp_path / "models" / "generator.pkl"
    save_generator_pickle(G, path)
    assert os.listdir(path.parent) == ["generator.pkl"]  # no temp file left behind
    ws = G.mapping(torch.randn(3, 32))
    torch.save(ws, tmp_path / "ws.pt")
    script = (
        "import sys, torch\n"
        f"sys.path[:] = [p for p in sys.path if p != ''] + [{STYLEGAN_DIR!r}]\n"
        "from generator_io import load_generator_pickle\n"
        f"G = load_generator_pickle({str(path)!r})\n"
        "assert type(G).__module__ == 'compact_stylegan' and not G.training\n"
        "assert not any(p.requires_grad for p in G.parameters())\n"
        f"torch.save(G.synthesis(torch.load({str(tmp_path / 'ws.pt')!r}), noise_mode='const'), "
        f"{str(tmp_path / 'img.pt')!r})\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = G.synthesis(ws, noise_mode="const")
    assert (torch.load(tmp_path / "img.pt") - expected).abs().max() < 1e-6


def test_load_returns_a_frozen_generator_on_the_device(tmp_path):
    G = small_generator(img_resolution=8).train()
    path = tmp_path / "g.pkl"
    save_generator_pickle(G, path)
    save_generator_pickle(G, path)  # overwriting works
    assert G.training and all(p.requires_grad for p in G.parameters())  # the original is untouched
    loaded = load_generator_pickle(path, device=torch.device("cpu"))
    assert isinstance(loaded, CompactGenerator) and not loaded.training
    assert all(not p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(loaded.mapping.w_avg, G.mapping.w_avg)


def test_failed_save_leaves_nothing_behind(tmp_path):
    G = small_generator(img_resolution=8)
    G.unpicklable = lambda: None
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_generator_pickle(G, tmp_path / "g.pkl")
    assert os.listdir(tmp_path) == []


def write_pickle(path, obj):
    with open(path, "wb") as file:
        pickle.dump(obj, file)
    return path


def assert_load_error(path, *fragments):
    with pytest.raises(GeneratorLoadError) as caught:
        load_generator_pickle(path)
    message = str(caught.value)
    assert "\n" not in message
    assert "stylegan-3-models/README.md" in message and "stylegan-xl-models/README.md" in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file_is_reported(tmp_path):
    assert_load_error(tmp_path / "nope.pkl", "not found", "nope.pkl")


def test_text_file_is_not_a_pickle(tmp_path):
    path = tmp_path / "notes.pkl"
    path.write_text("just some text\n")
    assert_load_error(path, "not a readable generator pickle")


def test_truncated_pickle_is_reported(tmp_path):
    path = write_pickle(tmp_path / "g.pkl", {"G_ema": small_generator(img_resolution=8)})
    path.write_bytes(path.read_bytes()[:200])
    assert_load_error(path, "not a readable generator pickle")


def test_pickle_without_g_ema_lists_what_it_found(tmp_path):
    path = write_pickle(tmp_path / "g.pkl", {"G": 1, "D": 2})
    assert_load_error(path, "no 'G_ema'", "['D', 'G']")


def test_object_without_the_interface_lists_the_missing_attributes(tmp_path):
    path = write_pickle(tmp_path / "g.pkl", {"G_ema": nn.Linear(2, 2)})
    message = assert_load_error(path, "without the StyleGAN generator interface")
    assert "missing: z_dim, w_dim, c_dim, num_ws, img_resolution, img_channels, mapping, synthesis" in message


def test_nvidia_format_pickle_loads_through_stylegan_utils(tmp_path):
    # self_contained=True writes NVIDIA's persistent format: the classes travel as embedded source and
    # rebuild through stylegan/stylegan-utils, which load_generator_pickle puts on sys.path itself.
    G = small_generator(img_resolution=8)
    path = tmp_path / "official-format.pkl"
    save_generator_pickle(G, path, self_contained=True)
    assert b"torch_utils.persistence" in path.read_bytes() and b"compact_stylegan" not in path.read_bytes()
    ws = G.mapping(torch.randn(2, 32))
    torch.save(ws, tmp_path / "ws.pt")
    script = (
        "import sys, torch\n"
        f"sys.path[:] = [p for p in sys.path if p != ''] + [{STYLEGAN_DIR!r}]\n"
        "from generator_io import load_generator_pickle\n"
        f"G = load_generator_pickle({str(path)!r})\n"
        "assert type(G).__module__.startswith('_imported_module_'), type(G).__module__\n"
        f"torch.save(G.synthesis(torch.load({str(tmp_path / 'ws.pt')!r})), {str(tmp_path / 'img.pt')!r})\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = G.synthesis(ws)
    # Another process may use another thread count, which reorders floating-point sums.
    assert torch.allclose(torch.load(tmp_path / "img.pt"), expected, atol=1e-6)


def test_pickle_needing_another_missing_module_names_it(tmp_path):
    path = tmp_path / "g.pkl"
    path.write_bytes(b"cno_such_module_xyz\nThing\n.")
    assert_load_error(path, "needs the module 'no_such_module_xyz'")


# ---- the generator registry (flcore/generators/registry.py) ------------------------------------

def registry_file(name, tmp_path, request):
    """-GPath for registry entry `name`: a file of tiny random weights made here ("" for entries without one)."""
    from flcore.generators.dcgan import DCGANGenerator

    if name in ("stylegan-3", "stylegan-xl"):
        save_generator_pickle(small_generator(img_resolution=8, c_dim=5 if name == "stylegan-xl" else 0),
                              tmp_path / "g.pkl")
        return str(tmp_path / "g.pkl")
    if name == "dcgan":
        torch.manual_seed(0)
        torch.save({"netG_state_dict": DCGANGenerator(z_dim=16, widths=(8, 4)).state_dict()}, tmp_path / "g.tar")
        return str(tmp_path / "g.tar")
    if name == "stable-diffusion":
        return request.getfixturevalue("tiny_sd_pipeline")
    return ""


# The paper's FedKTL hyperparameters (lambda, mu, server lr) per entry, where the paper has them.
PAPER_DEFAULTS = {"stylegan-3": (0.1, 50.0, 0.01), "stylegan-xl": (1.0, 50.0, 0.01),
                  "stable-diffusion": (0.01, 100.0, 0.1), "dcgan": None, "face-dcgan": None, "untrained": None,
                  "tiny-imagenet": None}


def test_every_registry_entry_is_tested_below():
    from flcore.generators.registry import GENERATORS

    assert set(GENERATORS) == set(PAPER_DEFAULTS)


@pytest.mark.parametrize("name", list(PAPER_DEFAULTS))
def test_registry_entry_loads_draws_and_renders(name, tmp_path, request):
    from types import SimpleNamespace

    from flcore.generators.registry import GENERATORS, load_generator
    from flcore.load_cache import LoadCache
    from flcore.servers.serverktl import FedKTLSettings

    settings = FedKTLSettings(generator=name, generator_path=registry_file(name, tmp_path, request), sd_steps=2)
    context = SimpleNamespace(device=torch.device("cpu"), image_shape=(3, 32, 32))
    adapter = load_generator(settings, context, LoadCache())
    latents = adapter.sample_valid(3, torch.Generator().manual_seed(0))
    assert latents.shape == (3, adapter.latent_dim) and torch.isfinite(latents).all()
    with torch.no_grad():
        images = adapter.render(adapter.renderable(latents))
    assert images.dim() == 4 and len(images) == 3 and images.shape[1] in (1, 3) and torch.isfinite(images).all()
    defaults = GENERATORS[name].defaults
    expected = PAPER_DEFAULTS[name]
    assert (defaults is None) if expected is None else ((defaults.lamda, defaults.mu, defaults.server_lr) == expected)


def test_auto_resolves_by_the_file_and_the_algorithm(tmp_path, request):
    from flcore.generators.registry import resolve_generator

    stylegan = ("dcgan", "stylegan-3")
    assert resolve_generator("auto", "", stylegan, "face-dcgan") == "face-dcgan"
    assert resolve_generator("auto", registry_file("dcgan", tmp_path, request), stylegan, "face-dcgan") == "dcgan"
    assert resolve_generator("auto", registry_file("stylegan-3", tmp_path, request), stylegan,
                             "face-dcgan") == "stylegan-3"
    assert resolve_generator("auto", str(tmp_path / "missing.pkl"), stylegan, "face-dcgan") == "stylegan-3"
    assert resolve_generator("auto", registry_file("dcgan", tmp_path, request), ("stable-diffusion",),
                             "stable-diffusion") == "stable-diffusion"
    assert resolve_generator("untrained", registry_file("dcgan", tmp_path, request), stylegan,
                             "face-dcgan") == "untrained"


def test_a_registered_generator_can_be_chosen_with_gen():
    from types import SimpleNamespace

    from flcore.generators import registry
    from flcore.generators.base import GeneratorEntry
    from flcore.load_cache import LoadCache
    from flcore.servers.serverktl import FedKTLSettings

    class Constant(GeneratorEntry):
        def load(self, settings, context, cache):
            return SimpleNamespace(latent_dim=2)

    registry.register_generator("constant", Constant())
    try:
        settings = FedKTLSettings(generator="constant")
        assert registry.load_generator(settings, SimpleNamespace(), LoadCache()).latent_dim == 2
    finally:
        del registry.GENERATORS["constant"]


@pytest.mark.parametrize("name", ["untrained", "face-dcgan", "tiny-imagenet"])
def test_a_generator_that_reads_no_file_refuses_a_path(name):
    from flcore.errors import UserError
    from flcore.servers.serverktl import FedKTLSettings

    with pytest.raises(UserError, match=f"-gen {name} reads no file, but -GPath g.pkl was given"):
        FedKTLSettings(generator=name, generator_path="g.pkl")
    assert FedKTLSettings(generator="auto", generator_path="g.pkl").generator_path == "g.pkl"


def test_the_shipped_natural_image_generator_renders_32px_colour_images_that_vary():
    from types import SimpleNamespace

    from flcore.generators.registry import load_generator
    from flcore.load_cache import LoadCache
    from flcore.servers.serverktl import FedKTLSettings

    settings = FedKTLSettings(generator="tiny-imagenet")
    adapter = load_generator(settings, SimpleNamespace(device=torch.device("cpu"), image_shape=(3, 32, 32)), LoadCache())
    with torch.no_grad():
        images = adapter.render(adapter.renderable(adapter.sample_valid(8, torch.Generator().manual_seed(0))))
    assert images.shape == (8, 3, 32, 32) and adapter.latent_dim == 100
    assert images.min() >= -1 and images.max() <= 1
    # A trained generator: different latents give different images, and its colour channels differ (not grey).
    assert (images[0] - images[1]).abs().mean() > 0.05
    assert (images[:, 0] - images[:, 2]).abs().mean() > 0.02


def test_a_missing_natural_image_generator_file_is_one_line_naming_the_fix(monkeypatch):
    from types import SimpleNamespace

    from flcore.errors import UserError
    from flcore.generators import dcgan
    from flcore.generators.registry import load_generator
    from flcore.load_cache import LoadCache
    from flcore.servers.serverktl import FedKTLSettings

    monkeypatch.setattr(dcgan, "TINY_IMAGENET_DCGAN", "/nonexistent/tiny.pt")
    with pytest.raises(UserError, match="tiny-imagenet-dcgan/README.md") as info:
        load_generator(FedKTLSettings(generator="tiny-imagenet"), SimpleNamespace(device=torch.device("cpu")),
                       LoadCache())
    assert "\n" not in str(info.value)
