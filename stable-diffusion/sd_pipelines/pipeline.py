"""A Stable Diffusion (1.x/2.x) pipeline that renders given initial noise latents with given prompt embeddings.

FedKTL treats the sampler's initial latent as the generator's latent space, so the server encodes its prompt
once and then renders many latents. diffusers' own `__call__` multiplies given latents by the scheduler's
`init_noise_sigma`; here the latents are used as they are (they are already valid initial noise).
"""
import glob
import os
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import is_accelerate_available

WEIGHTS_README = "stable-diffusion/v1.5/README.md"

# What a diffusers Stable Diffusion folder must hold: per part, groups of file patterns; each group needs a match.
UNET_VAE_WEIGHTS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")
REQUIRED_FILES = {
    "": (("model_index.json",),),
    "unet": (("config.json",), UNET_VAE_WEIGHTS),
    "vae": (("config.json",), UNET_VAE_WEIGHTS),
    "text_encoder": (("config.json",), ("model*.safetensors", "pytorch_model*.bin")),
    "tokenizer": (("tokenizer.json", "vocab.json"),),
    "scheduler": (("scheduler_config.json",),),
}
WEIGHTED_PARTS = ("unet", "vae", "text_encoder")
FP16_VARIANT = "fp16"


class PipelineFolderError(ValueError):
    """The folder is not a complete diffusers Stable Diffusion pipeline."""


def check_folder(folder):
    """Raises PipelineFolderError naming the first missing part of the diffusers layout."""
    if not os.path.isdir(folder):
        raise PipelineFolderError(f"{folder} is not a folder; -GPath needs a diffusers Stable Diffusion folder "
                                  f"(see {WEIGHTS_README})")
    for part, groups in REQUIRED_FILES.items():
        for patterns in groups:
            if not any(glob.glob(os.path.join(folder, part, pattern)) for pattern in patterns):
                where = os.path.join(part, " or ".join(patterns)) if part else patterns[0]
                raise PipelineFolderError(f"{folder} has no {where}: the Stable Diffusion folder is incomplete "
                                          f"(see {WEIGHTS_README})")


def weights_variant(folder):
    """'fp16' when the weights exist only as fp16 variant files (`*.fp16.safetensors`), else None."""
    names = [os.path.basename(path) for part in WEIGHTED_PARTS for suffix in ("*.safetensors", "*.bin")
             for path in glob.glob(os.path.join(folder, part, suffix))]
    return FP16_VARIANT if names and all(f".{FP16_VARIANT}." in name for name in names) else None


@dataclass
class PromptEmbeddings:
    """Text-encoder outputs for one prompt; `negative` is None when sampling without classifier-free guidance."""
    positive: torch.Tensor
    negative: torch.Tensor | None


class LatentsToImagePipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline that samples from caller-given initial latents and prompt embeddings."""

    @classmethod
    def from_folder(cls, folder, dtype=torch.float32):
        """Loads a local diffusers folder without the safety checker and without touching the network."""
        check_folder(folder)
        # Without accelerate, diffusers cannot load with low memory and would say so on every load.
        pipeline = cls.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                       variant=weights_variant(folder), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False,
                                       low_cpu_mem_usage=is_accelerate_available())
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    @property
    def default_resolution(self):
        """The image side the UNet was trained for (512 for v1.5)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def latent_shape(self, resolution):
        """(C, H/f, W/f) of the initial latent for square images of side `resolution` (f = VAE down-scaling)."""
        if resolution <= 0 or resolution % self.vae_scale_factor:
            raise ValueError(f"the image side must be a positive multiple of {self.vae_scale_factor}, "
                             f"got {resolution}")
        side = resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    def initial_noise_sigma(self, num_inference_steps):
        """Standard deviation of valid initial latents for this scheduler and number of steps."""
        self.scheduler.set_timesteps(num_inference_steps)
        return float(self.scheduler.init_noise_sigma)

    @torch.inference_mode()
    def embed_prompt(self, prompt, negative_prompt="", guided=True):
        """Encodes the prompt once (and the negative prompt, "" for the unconditional one, when guided)."""
        positive, negative = self.encode_prompt(prompt, self._execution_device, 1, guided,
                                                negative_prompt=negative_prompt if guided else None)
        return PromptEmbeddings(positive, negative)

    def tokenize(self, prompts):
        """Token ids [n, L] of the prompts, padded and truncated to the text encoder's length as encode_prompt does:
        what a client that holds the (public) tokenizer can send instead of the prompt's text."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.inference_mode()
    def embed_tokens(self, token_ids, negative_prompt="", guided=True):
        """PromptEmbeddings of token ids [n, L] (and of the negative prompt, "" for the unconditional one, when
        guided), as encode_prompt computes them for Stable Diffusion 1.x/2.x text encoders."""
        device = self._execution_device
        positive = self.text_encoder(token_ids.to(device))[0]
        negative = self.text_encoder(self.tokenize([negative_prompt]).to(device))[0] if guided else None
        return PromptEmbeddings(positive, negative)

    @torch.inference_mode()
    def sample_from_latents(self, latents, embeddings, num_inference_steps=50, guidance_scale=7.5, seed=0):
        """Denoises the initial latents [n, C, h, w] and decodes them: images [n, 3, H, W] in [-1, 1].
        `seed` drives the noise of stochastic schedulers, so a latent always renders to the same image."""
        device, dtype = self._execution_device, self.unet.dtype
        latents = latents.to(device, dtype)
        n = latents.shape[0]
        guided = embeddings.negative is not None
        context = embeddings.positive.to(device, dtype).expand(n, -1, -1)
        if guided:
            context = torch.cat([embeddings.negative.to(device, dtype).expand(n, -1, -1), context])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = self.prepare_extra_step_kwargs(torch.Generator(device).manual_seed(seed), 0.0)
        for t in self.scheduler.timesteps:
            model_input = self.scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
            noise = self.unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
            if guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return images.clamp(-1, 1)
