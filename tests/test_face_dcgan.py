"""The pre-trained face DCGAN (gan-face-generate's weights in our own generator class) and the Gaussian-prior
adapter: loading, fidelity, what its images look like, centroids brought back to renderable norms."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flcore.generators import dcgan
from flcore.generators.dcgan import (
    DCGANGenerator,
    DCGANLoadError,
    GaussianLatents,
    face_dcgan_weights_path,
    load_dcgan_checkpoint,
    rescale_to_norm,
    typical_gaussian_norm,
)
from flcore.generators.stylegan import StyleGANLatents
from flcore.images import image_metrics
from flutils import experiment
from flcore.errors import UserError

# make_server's algorithm and flags: a short domain alignment.
FAST_KTL = ["FedKTL-stylegan-3", "-se", "3", "-sbs", "8"]
WEIGHTS = face_dcgan_weights_path()
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason=f"install the face generator: {dcgan.FACE_DCGAN_INSTALL}")


@pytest.fixture(scope="module")
def face_generator():
    return load_dcgan_checkpoint(WEIGHTS)


def latents(n, seed=0):
    return torch.randn(n, 100, generator=torch.Generator().manual_seed(seed))


def reference_render(state, z):
    """The standard DCGAN forward written out with functional ops on the checkpoint's raw tensors."""
    x = z.view(len(z), -1, 1, 1)
    convs = sorted({int(k.split(".")[1]) for k, v in state.items() if v.dim() == 4})
    for i, index in enumerate(convs):
        stride, padding = (1, 0) if i == 0 else (2, 1)
        x = F.conv_transpose2d(x, state[f"main.{index}.weight"], stride=stride, padding=padding)
        if index == convs[-1]:
            return torch.tanh(x)
        bn = f"main.{index + 1}"
        x = F.relu(F.batch_norm(x, state[f"{bn}.running_mean"], state[f"{bn}.running_var"],
                                state[f"{bn}.weight"], state[f"{bn}.bias"], training=False, eps=1e-5))


@needs_weights
def test_weights_are_found_without_importing_the_package():
    code = ("import sys; from flcore.generators.dcgan import face_dcgan_weights_path; "
            "p = face_dcgan_weights_path(); assert p and p.endswith('weights.tar'); "
            "assert 'gan_face_generate' not in sys.modules; print('ok')")
    system = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "system")
    out = subprocess.run([sys.executable, "-c", code], cwd=system, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_weights
def test_loaded_generator_matches_a_functional_reference(face_generator):
    assert (face_generator.z_dim, face_generator.img_resolution, face_generator.img_channels) == (100, 64, 3)
    assert sum(p.numel() for p in face_generator.parameters()) == 3_576_704
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)["netG_state_dict"]
    z = latents(3, seed=7)
    with torch.no_grad():
        assert torch.allclose(face_generator(z), reference_render(state, z), atol=1e-5)


@needs_weights
def test_images_look_like_a_trained_generator_not_an_untrained_one(face_generator):
    torch.manual_seed(0)
    untrained = DCGANGenerator().eval()
    z = latents(16)
    with torch.no_grad():
        trained_images, untrained_images = face_generator(z), untrained(z)

    def neighbour_correlation(x):
        return float(torch.corrcoef(torch.stack([x[..., 1:].flatten(), x[..., :-1].flatten()]))[0, 1])

    trained, random = image_metrics(trained_images), image_metrics(untrained_images)
    # Measured: trained std 0.35, pairwise 0.55, neighbour correlation 0.97; untrained about 0.001 / 0.001 / -0.3.
    assert 0.2 < trained["image_std"] < 0.6 and trained["image_distance"] > 0.3
    assert random["image_std"] < 0.05 and random["image_distance"] < 0.05
    assert neighbour_correlation(trained_images) > 0.9 > neighbour_correlation(untrained_images)
    assert trained_images.min() >= -1 and trained_images.max() <= 1


@needs_weights
def test_class_means_render_average_faces_and_rescaling_restores_distinct_ones(face_generator):
    """A mean of Gaussian latents has a small norm and renders the generator's blurred average."""
    z = latents(48, seed=3)
    means = z.view(12, 4, 100).mean(1)
    adapter = GaussianLatents(face_generator, "cpu", rescale=True)
    assert means.norm(dim=1).mean() < 0.6 * typical_gaussian_norm(100)
    rescaled = adapter.renderable(means)
    assert torch.allclose(rescaled.norm(dim=1), torch.full((12,), typical_gaussian_norm(100)), atol=1e-4)
    with torch.no_grad():
        blurred, sharp, samples = (image_metrics(face_generator(v)) for v in (means, rescaled, z[:12]))
    # Measured: means 0.21 std / 0.25 distance; rescaled 0.39 / 0.51; samples 0.35 / 0.54.
    assert blurred["image_distance"] < 0.7 * sharp["image_distance"]
    assert sharp["image_distance"] > 0.8 * samples["image_distance"]
    assert torch.equal(GaussianLatents(face_generator, "cpu", rescale=False).renderable(means), means)


def test_typical_gaussian_norm_matches_sampling():
    for dim in (2, 100, 4096):
        sampled = torch.randn(20000, dim, generator=torch.Generator().manual_seed(dim)).norm(dim=1).mean()
        assert typical_gaussian_norm(dim) == pytest.approx(float(sampled), rel=2e-3)
    assert typical_gaussian_norm(100) == pytest.approx(math.sqrt(99.5), rel=1e-4)


def test_rescale_to_norm_keeps_directions():
    rows = torch.tensor([[3.0, 4.0], [0.0, -0.5]])
    out = rescale_to_norm(rows, 10.0)
    assert torch.allclose(out, torch.tensor([[6.0, 8.0], [0.0, -10.0]]))


def random_dcgan_checkpoint(path, widths=(32, 16), seed=0):
    torch.manual_seed(seed)
    G = DCGANGenerator(z_dim=100, widths=widths)
    state = {}
    index = 0
    for block in G.blocks:  # written in the common main.<i> layout: conv, BN, ReLU per block, then conv, tanh
        state.update({f"main.{index}.{k}": v for k, v in block[0].state_dict().items()})
        state.update({f"main.{index + 1}.{k}": v for k, v in block[1].state_dict().items()})
        index += 3
    state.update({f"main.{index}.{k}": v for k, v in G.to_image.state_dict().items()})
    torch.save({"netG_state_dict": state}, path)
    return G.eval()


def test_a_dcgan_checkpoint_in_the_common_layout_loads_sized_from_its_shapes(tmp_path):
    original = random_dcgan_checkpoint(tmp_path / "g.tar", widths=(48, 24, 12))
    loaded = load_dcgan_checkpoint(tmp_path / "g.tar")
    assert loaded.widths == (48, 24, 12) and loaded.img_resolution == 32
    z = latents(2)
    with torch.no_grad():
        assert torch.equal(loaded(z), original(z))


@pytest.mark.parametrize("content,fragment", [(b"not a checkpoint", "not a readable torch checkpoint"),
                                              ({"other": 1}, "no generator state dict"),
                                              ({"netG_state_dict": {"main.0.weight": torch.zeros(100, 8, 4, 4)}},
                                               "fewer than two")])
def test_bad_dcgan_checkpoints_get_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "bad.tar"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(DCGANLoadError, match=fragment):
        load_dcgan_checkpoint(path)
    with pytest.raises(DCGANLoadError, match="no DCGAN checkpoint"):
        load_dcgan_checkpoint(tmp_path / "missing.tar")


@needs_weights
def test_face_dcgan_is_the_default_and_clients_regress_the_rendered_latent(make_server, round_timer):
    server = make_server(*FAST_KTL)
    adapter = server.algorithm.image_generator
    assert isinstance(adapter, GaussianLatents) and adapter.latent_dim == 100
    server.exchange(server.clients, round_timer(server))
    norms = server.algorithm.pair_latents.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, typical_gaussian_norm(100)), atol=1e-4)
    with torch.no_grad():
        expected = F.interpolate(adapter.render(server.algorithm.pair_latents), size=(32, 32), mode="bilinear",
                                 align_corners=False, antialias=True)
    assert torch.allclose(server.algorithm.pair_images, expected.clamp(-1, 1), atol=1e-5), \
        "the images are of the sent latents"
    metrics = server.algorithm.round_metrics
    assert metrics["pair_latent_norm"] == pytest.approx(typical_gaussian_norm(100), rel=1e-4)
    assert metrics["valid_latent_norm"] == pytest.approx(typical_gaussian_norm(100), rel=0.05)
    assert metrics["image_distance"] > 0.2


@needs_weights
def test_without_rescaling_the_class_means_are_rendered_as_they_are(make_server, round_timer):
    server = make_server(*FAST_KTL, "-lrs", "0")
    server.exchange(server.clients, round_timer(server))
    assert torch.equal(server.algorithm.pair_latents, server.algorithm.centroids.detach())
    assert server.algorithm.round_metrics["pair_latent_norm"] < server.algorithm.round_metrics["valid_latent_norm"]


def test_without_the_package_the_default_falls_back_in_one_line(make_server, monkeypatch, capsys):
    monkeypatch.setattr(dcgan, "face_dcgan_weights_path", lambda: None)
    server = make_server(*FAST_KTL)
    assert isinstance(server.algorithm.image_generator, StyleGANLatents)
    lines = [line for line in capsys.readouterr().out.splitlines() if "not installed" in line]
    assert len(lines) == 1 and dcgan.FACE_DCGAN_INSTALL in lines[0]


def test_untrained_flag_selects_the_builtin_generator(make_server):
    assert isinstance(make_server(*FAST_KTL, "-gen", "untrained").algorithm.image_generator, StyleGANLatents)


def test_gpath_takes_a_dcgan_checkpoint_end_to_end(small_run, results_of, tmp_path):
    random_dcgan_checkpoint(tmp_path / "g.tar")
    argv = small_run("-algo", *FAST_KTL, "-gr", "2", "-GPath", str(tmp_path / "g.tar"), "--image_every", "0")
    assert experiment.main(argv) == 0
    data = results_of(argv)
    for key in ("class_mean_norm", "pair_latent_norm", "valid_latent_norm", "image_distance", "image_std"):
        assert len(data[key]) == 2 and all(math.isfinite(v) for v in data[key]), key
    assert data["pair_latent_norm"][0] == pytest.approx(typical_gaussian_norm(100), rel=1e-4)


@pytest.mark.parametrize("content,fragment", [
    ({"netG_state_dict": {"main.0.weight": torch.zeros(100, 8, 4, 4)}}, "fewer than two"),
    ({"G_ema": 1}, "no generator state dict")])
def test_a_bad_dcgan_path_is_a_user_error(make_server, tmp_path, content, fragment):
    torch.save(content, tmp_path / "g.tar")
    with pytest.raises(UserError, match=fragment):
        make_server(*FAST_KTL, "-GPath", str(tmp_path / "g.tar"))
