"""FedKTL with Stable Diffusion, on a tiny random-weight pipeline saved in the diffusers layout (conftest's
tiny_sd_pipeline) and loaded through -GPath like real weights."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline  # noqa: E402

from flcore.generators.dcgan import typical_gaussian_norm  # noqa: E402
from flcore.load_cache import LoadCache  # noqa: E402
from flcore.images import to_client_images  # noqa: E402
from flutils import experiment  # noqa: E402
from flutils.data import load_federated_dataset  # noqa: E402
from flcore.errors import UserError  # noqa: E402
from flutils.options import parse_args  # noqa: E402
from flcore.paths import REPO_ROOT  # noqa: E402
from sd_pipelines.pipeline import LatentsToImagePipeline  # noqa: E402

# One small client model and large batches keep the runs short; the generator is what is tested here.
FAST = ["-m", "tiny_cnn", "-lbs", "100", "-se", "5", "-sbs", "8", "--sd_steps", "2", "--image_every", "0"]
TINY_LATENT_SHAPE = (4, 8, 8)  # UNet sample_size 8, VAE with 4 blocks: 8x down-scaling, 64x64 images
DOWNLOAD = os.path.join(REPO_ROOT, "stable-diffusion", "v1.5", "download.py")


@pytest.fixture(scope="module")
def pipeline(tiny_sd_pipeline):
    return LatentsToImagePipeline.from_folder(tiny_sd_pipeline)


@pytest.fixture
def sd_argv(small_run, tiny_sd_pipeline):
    """main.py flags of a small FedKTL-stable-diffusion run on the tiny pipeline (or the folder `path`)."""
    def argv(*extra, path=tiny_sd_pipeline):
        return small_run("-algo", "FedKTL-stable-diffusion", "-GPath", path, *FAST, *extra)
    return argv


@pytest.fixture
def sd_server(sd_argv, server_from_argv, tiny_sd_pipeline):
    """sd_server(*flags, path=...): the server of such a run."""
    def build(*flags, path=tiny_sd_pipeline):
        return server_from_argv(sd_argv(*flags, path=path))
    return build


def test_latent_dim_comes_from_the_unet_and_vae_configs(sd_server):
    adapter = sd_server().algorithm.image_generator
    assert adapter.latent_shape == TINY_LATENT_SHAPE and adapter.latent_dim == 4 * 8 * 8
    assert adapter.pipeline.default_resolution == 64
    smaller = sd_server("--sd_resolution", "32").algorithm.image_generator
    assert smaller.latent_shape == (4, 4, 4) and smaller.latent_dim == 64


def test_paper_defaults_and_float32_on_cpu(sd_server):
    server = sd_server("--sd_dtype", "float16")
    assert (server.algorithm.settings.lamda, server.algorithm.settings.mu,
            server.algorithm.settings.server_learning_rate) == (0.01, 100.0, 0.1)
    assert server.algorithm.image_generator.pipeline.dtype == torch.float32
    assert server.algorithm.image_generator.pipeline.safety_checker is None


def test_pipeline_is_loaded_once_per_experiment(sd_argv, server_from_argv):
    """The runs of one experiment share its LoadCache, so they share one pipeline; another experiment loads its own."""
    cache = LoadCache()
    first = server_from_argv(sd_argv(), cache=cache)
    second = server_from_argv(sd_argv("--seed", "3"), cache=cache)
    assert first.algorithm.image_generator.pipeline is second.algorithm.image_generator.pipeline
    assert (server_from_argv(sd_argv()).algorithm.image_generator.pipeline
            is not first.algorithm.image_generator.pipeline)


def test_valid_latents_are_scaled_standard_normal(sd_server):
    adapter = sd_server().algorithm.image_generator
    sigma = adapter.pipeline.initial_noise_sigma(2)
    assert sigma > 5, "Euler's initial noise is far wider than N(0, 1)"
    assert adapter.noise_sigma == pytest.approx(sigma)
    latents = adapter.sample_valid(64, torch.Generator().manual_seed(1))
    assert latents.shape == (64, adapter.latent_dim)
    assert latents.std().item() == pytest.approx(sigma, rel=0.03)
    assert abs(latents.mean().item()) < 0.05 * sigma
    assert torch.equal(latents, adapter.sample_valid(64, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("rescale", ["1", "0"])
def test_class_means_move_to_the_noise_norm_unless_lrs_0(sd_server, rescale):
    adapter = sd_server("-lrs", rescale).algorithm.image_generator
    means = adapter.sample_valid(12, torch.Generator().manual_seed(2)).view(3, 4, -1).mean(1)
    out = adapter.renderable(means)
    if rescale == "0":
        assert torch.equal(out, means)
        return
    typical = adapter.noise_sigma * typical_gaussian_norm(adapter.latent_dim)
    assert means.norm(dim=1).max() < 0.6 * typical
    assert torch.allclose(out.norm(dim=1), torch.full((3,), typical), rtol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(out, dim=1), torch.nn.functional.normalize(means, dim=1))


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_sampling_from_latents_matches_diffusers(tiny_sd_pipeline, pipeline, guidance):
    """Same images as diffusers' own sampler, which takes unscaled noise and multiplies it by init_noise_sigma."""
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    sigma = pipeline.initial_noise_sigma(2)
    latents = torch.randn(2, *TINY_LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * sigma
    embeddings = pipeline.embed_prompt("a cat", "blurry photo", guided=guidance > 1)
    assert (embeddings.negative is None) == (guidance <= 1)
    ours = pipeline.sample_from_latents(latents, embeddings, 2, guidance)
    theirs = reference(["a cat"] * 2, negative_prompt=["blurry photo"] * 2, latents=latents / sigma,
                       num_inference_steps=2, guidance_scale=guidance, output_type="pt").images
    assert ours.shape == (2, 3, 64, 64) and ours.min() >= -1 and ours.max() <= 1
    torch.testing.assert_close(ours * 0.5 + 0.5, theirs, atol=1e-5, rtol=0)


def test_negative_prompt_changes_the_images(pipeline):
    latents = torch.randn(1, *TINY_LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * 3
    plain = pipeline.sample_from_latents(latents, pipeline.embed_prompt("a cat", ""), 2, 7.5)
    negative = pipeline.sample_from_latents(latents, pipeline.embed_prompt("a cat", "blurry dog"), 2, 7.5)
    assert (plain - negative).abs().max() > 1e-4


def v15_shaped_copy(tiny_sd_pipeline, folder):
    """The tiny pipeline laid out as the v1.5 release is: model_index.json names a safety checker and a feature
    extractor that are not there, the tokenizer is vocab.json + merges.txt, and the scheduler is PNDM."""
    shutil.copytree(tiny_sd_pipeline, folder)
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], scheduler=["diffusers", "PNDMScheduler"])
    with open(index_path, "w") as f:
        json.dump(index, f)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                   "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}, f)
    tokenizer = os.path.join(folder, "tokenizer")
    os.remove(os.path.join(tokenizer, "tokenizer.json"))
    for name in ("vocab.json", "merges.txt"):  # the vocabulary the tiny pipeline was made with
        shutil.copy(os.path.join(os.path.dirname(tiny_sd_pipeline), name), tokenizer)
    return folder


def test_a_folder_laid_out_like_the_v15_release_loads(tiny_sd_pipeline, tmp_path, sd_server):
    adapter = sd_server(path=v15_shaped_copy(tiny_sd_pipeline, str(tmp_path / "v15"))).algorithm.image_generator
    assert type(adapter.pipeline.scheduler).__name__ == "PNDMScheduler" and adapter.noise_sigma == 1.0
    assert adapter.pipeline.safety_checker is None
    images = adapter.render(adapter.sample_valid(1, torch.Generator().manual_seed(0)))
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_one_image_per_class_at_the_clients_size_in_gbs_batches(sd_server, round_timer):
    server = sd_server("-gbs", "4")
    adapter = server.algorithm.image_generator
    batch_sizes = []
    render = adapter.render

    def counted_render(latents):
        batch_sizes.append(len(latents))
        return render(latents)

    adapter.render = counted_render
    server.exchange(server.clients, round_timer(server))
    images, latents = server.algorithm.pair_images, server.algorithm.pair_latents
    assert batch_sizes == [4, 4, 2]
    assert images.shape == (10, *server.dataset.image_shape) and latents.shape == (10, adapter.latent_dim)
    assert images.min() >= -1 and images.max() <= 1
    assert (images[0] - images[1]).abs().max() > 1e-4, "different centroids render different images"
    rendered = render(latents[-2:])
    assert rendered.dtype == torch.float32 and not rendered.is_inference(), "clients backpropagate through them"
    torch.testing.assert_close(images[-2:], to_client_images(rendered, server.dataset.image_shape), atol=1e-6, rtol=0)


def test_two_rounds_end_to_end(sd_argv, results_of):
    argv = sd_argv("-gr", "2")
    assert experiment.main(argv) == 0
    data = results_of(argv)
    assert len(data["align_mmd"]) == 2 and np.all(np.isfinite(data["align_mmd"]))
    assert len(data["rs_test_acc"]) == 3 and np.all(np.isfinite(data["rs_train_loss"][1:]))
    image_floats = int(np.prod(load_federated_dataset(parse_args(argv).run).image_shape))
    pairs, proj = 10 * (image_floats + 256), 64 * 256 + 256
    assert data["download_floats"].tolist() == [0, 4 * (pairs + proj)], "K images + K latents, proj once"


def test_missing_gpath_points_to_the_weights_readme(make_server):
    with pytest.raises(UserError, match="stable-diffusion/v1.5/README.md"):
        make_server("FedKTL-stable-diffusion")


def incomplete_copy(tiny_sd_pipeline, tmp_path, remove):
    folder = str(tmp_path / "broken")
    shutil.copytree(tiny_sd_pipeline, folder)
    target = os.path.join(folder, remove)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    return folder


@pytest.mark.parametrize("remove,named", [("model_index.json", "model_index.json"), ("unet", "unet/config.json"),
                                          ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model"),
                                          ("text_encoder", "text_encoder/config.json"),
                                          ("tokenizer", "tokenizer/tokenizer.json"),
                                          ("scheduler", "scheduler/scheduler_config.json")])
def test_incomplete_folder_names_the_missing_part(tiny_sd_pipeline, tmp_path, sd_argv, error_line, results_dir,
                                                  remove, named):
    argv = sd_argv("-gr", "1", path=incomplete_copy(tiny_sd_pipeline, tmp_path, remove))
    line = error_line(experiment.main, argv)
    assert named in line and "v1.5/README.md" in line
    assert not os.path.exists(results_dir(argv))


def test_corrupt_weights_are_a_one_line_error(tiny_sd_pipeline, tmp_path, sd_server):
    folder = str(tmp_path / "corrupt")
    shutil.copytree(tiny_sd_pipeline, folder)
    with open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(b"not safetensors")
    with pytest.raises(UserError, match="cannot load the Stable Diffusion pipeline") as info:
        sd_server(path=folder)
    assert "\n" not in str(info.value)


def test_hub_name_is_not_fetched_offline(sd_server):
    start = time.perf_counter()
    with pytest.raises(UserError, match="is not a folder"):
        sd_server(path="stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert time.perf_counter() - start < 5, "a missing folder must fail without network look-ups"


@pytest.mark.parametrize("flags,fragment", [(["--sd_resolution", "36"], "multiple of 8"),
                                            (["--sd_steps", "0"], "--sd_steps")])
def test_bad_sampler_flags(sd_server, flags, fragment):
    with pytest.raises(UserError, match=fragment):
        sd_server(*flags)


def test_download_helper_fails_clearly_offline(tmp_path):
    out = tmp_path / "weights"
    proc = subprocess.run([sys.executable, DOWNLOAD, "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0], proc.stderr
    assert not out.exists()
