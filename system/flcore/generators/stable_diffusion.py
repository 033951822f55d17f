"""Stable Diffusion from a diffusers folder (the paper's Table 8): the latent space is the sampler's initial noise
latent (C x H/8 x W/8, flattened), valid latents are standard normal noise scaled by the scheduler's
init_noise_sigma, and a latent is rendered by running the sampler from it with a fixed prompt
(stable-diffusion/README.md). FGL loads its pipeline here too (`load_pipeline`)."""
import math
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from flcore.errors import UserError
from flcore.generators.base import GeneratorEntry, GeneratorSettings, PaperDefaults
from flcore.generators.dcgan import rescale_to_norm, typical_gaussian_norm
from flcore.settings import option

CUDA_DTYPES = {"auto": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class StableDiffusionSettings(GeneratorSettings):
    """How a Stable Diffusion pipeline is loaded and sampled (FedKTL with -gen stable-diffusion, FGL)."""
    title = "Stable Diffusion (FedKTL-stable-diffusion, FGL)"
    stable_diffusion_prompt: str = option("a cat", "-prompt", "--stable_diffusion_prompt")
    sd_steps: int = option(50, "--sd_steps", help="Stable Diffusion: denoising steps per image")
    sd_guidance: float = option(7.5, "--sd_guidance",
                                help="Stable Diffusion: classifier-free guidance scale (<= 1: no guidance)")
    sd_negative_prompt: str = option("", "--sd_negative_prompt", help="Stable Diffusion: negative prompt for guidance")
    sd_dtype: str = option("auto", "--sd_dtype", choices=("auto", "float32", "float16", "bfloat16"),
                           help="Stable Diffusion weights on CUDA (auto: float16); the CPU always uses float32")
    sd_resolution: int = option(0, "--sd_resolution",
                                help="Stable Diffusion: image side in pixels, a multiple of 8 (0: the model's own, 512 "
                                     "for v1.5); lower is faster and shrinks the latent")
    sd_attention_slicing: bool = option(False, "-sdas", "--sd_attention_slicing",
                                        help="Stable Diffusion: attention slicing (less GPU memory)")
    sd_vae_tiling: bool = option(False, "-sdvt", "--sd_vae_tiling",
                                 help="Stable Diffusion: tiled VAE decoding (less GPU memory)")

    def stable_diffusion_checks(self):
        """The (condition, message) checks of the sampling options, for the owner's validate()."""
        return [
            (self.sd_steps >= 1, f"--sd_steps must be >= 1, got {self.sd_steps}"),
            (self.sd_resolution >= 0, f"--sd_resolution must be >= 0 (0: the model's own), got {self.sd_resolution}"),
        ]


def pipeline_module():
    """Imported on first use, so a missing diffusers install is a one-line error, not a traceback."""
    try:
        from sd_pipelines import pipeline
    except ImportError as exc:
        raise UserError(f"-algo FedKTL-stable-diffusion needs diffusers and transformers ({exc}); "
                        f"run pip install -r requirements.txt") from None
    return pipeline


def pipeline_dtype(name, device):
    if device.type != "cuda":
        if name not in ("auto", "float32"):
            tqdm.write(f"FedKTL: --sd_dtype {name} is for CUDA; the CPU uses float32")
        return torch.float32
    return CUDA_DTYPES[name]


def load_pipeline(module, settings, device, cache):
    """The LatentsToImagePipeline of -GPath on `device` (settings: StableDiffusionSettings); the runs of one
    experiment (-t) share it through `cache` (flcore/load_cache.py) instead of re-loading it, as long as they load it
    the same way."""
    dtype = pipeline_dtype(settings.sd_dtype, device)
    key = (os.path.realpath(settings.generator_path), str(device), dtype, settings.sd_attention_slicing,
           settings.sd_vae_tiling)
    return cache.get("stable-diffusion pipeline", key, lambda: read_pipeline(module, settings, device, dtype))


def read_pipeline(module, settings, device, dtype):
    folder = settings.generator_path
    try:
        pipeline = module.LatentsToImagePipeline.from_folder(folder, dtype)
    except module.PipelineFolderError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # diffusers and transformers raise many kinds for broken configs or weights
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the Stable Diffusion pipeline in {folder}: {reason} "
                        f"(see {module.WEIGHTS_README})") from None
    pipeline.to(device)
    if settings.sd_attention_slicing:
        pipeline.enable_attention_slicing()
    if settings.sd_vae_tiling:
        pipeline.vae.enable_tiling()
    return pipeline


def latent_shape_at(pipeline, resolution):
    """The pipeline's initial-latent shape for --sd_resolution (0: the model's own), as a one-line error if the
    resolution does not fit."""
    try:
        return pipeline.latent_shape(resolution or pipeline.default_resolution)
    except ValueError as exc:
        raise UserError(f"--sd_resolution: {exc}") from None


class StableDiffusionLatents:
    """Initial-noise-latent adapter. It holds the pipeline and the prompt embeddings, encoded once; nothing in it
    changes between rounds, so the server's checkpoints need none of it."""

    def __init__(self, pipeline, latent_shape, prompt, negative_prompt, steps, guidance_scale, rescale=True):
        self.pipeline = pipeline
        self.rescale = rescale
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.latent_shape = latent_shape
        self.latent_dim = math.prod(self.latent_shape)
        self.noise_sigma = pipeline.initial_noise_sigma(steps)
        self.embeddings = pipeline.embed_prompt(prompt, negative_prompt, guided=guidance_scale > 1)

    def sample_valid(self, n, rng):
        """Drawn on the CPU (the rng's device), so a seed gives the same latents on any device."""
        return (torch.randn(n, self.latent_dim, generator=rng) * self.noise_sigma).to(self.pipeline.device)

    def renderable(self, latents):
        """A Gaussian prior: a class mean of noise latents is moved back to the typical noise norm (see
        GaussianLatents), so the sampler starts from noise of the scale it was trained on."""
        if not self.rescale:
            return latents
        return rescale_to_norm(latents, self.noise_sigma * typical_gaussian_norm(self.latent_dim))

    def render(self, latents):
        images = self.pipeline.sample_from_latents(latents.reshape(-1, *self.latent_shape), self.embeddings,
                                                   self.steps, self.guidance_scale)
        # Copied outside inference mode: inference tensors cannot be saved for the clients' backward passes.
        return images.to(torch.float32, copy=True)


class StableDiffusionEntry(GeneratorEntry):
    """A diffusers Stable Diffusion folder in -GPath, rendered with -prompt."""
    defaults = PaperDefaults(lamda=0.01, mu=100.0, server_lr=0.1)

    def recognizes(self, path):
        return os.path.isfile(os.path.join(path, "model_index.json"))

    def load(self, settings, context, cache):
        module = pipeline_module()
        if not settings.generator_path:
            raise UserError(f"-algo FedKTL-stable-diffusion needs -GPath <diffusers Stable Diffusion folder>, "
                            f"e.g. -GPath stable-diffusion/v1.5 (see {module.WEIGHTS_README} to get the weights)")
        pipeline = load_pipeline(module, settings, context.device, cache)
        resolution = settings.sd_resolution or pipeline.default_resolution
        latent_shape = latent_shape_at(pipeline, settings.sd_resolution)
        adapter = StableDiffusionLatents(pipeline, latent_shape, settings.stable_diffusion_prompt,
                                         settings.sd_negative_prompt, settings.sd_steps, settings.sd_guidance,
                                         rescale=settings.latent_rescale)
        tqdm.write(f"FedKTL: Stable Diffusion from {settings.generator_path} ({pipeline.dtype}), "
                   f"{resolution}x{resolution} images, latent {latent_shape} (init sigma {adapter.noise_sigma:.3f}), "
                   f"{settings.sd_steps} steps, guidance {settings.sd_guidance}, "
                   f"prompt {settings.stable_diffusion_prompt!r}")
        return adapter


STABLE_DIFFUSION = StableDiffusionEntry()
