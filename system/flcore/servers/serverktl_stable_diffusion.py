"""FedKTL with Stable Diffusion (the paper's Table 8): the latent space is the sampler's initial noise latent
(C x H/8 x W/8, flattened), valid latents are standard normal noise scaled by the scheduler's init_noise_sigma,
and a latent is rendered by running the sampler from it with a fixed prompt (stable-diffusion/README.md)."""
import math
import os

import torch
from tqdm import tqdm

from flcore.generators.adapter import PaperDefaults
from flcore.generators.dcgan import rescale_to_norm, typical_gaussian_norm
from flcore.servers.serverktl import ServerKTL
from flcore.errors import UserError
from flutils.options import bool_flag, raise_first_failed

CUDA_DTYPES = {"auto": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def load_pipeline(module, args, device, cache):
    """The LatentsToImagePipeline of -GPath on `device`; the runs of one experiment (-t) share it through `cache`
    (flcore/load_cache.py) instead of re-loading it, as long as they load it the same way."""
    dtype = pipeline_dtype(args.sd_dtype, device)
    key = (os.path.realpath(args.generator_path), str(device), dtype, args.sd_attention_slicing, args.sd_vae_tiling)
    return cache.get("stable-diffusion pipeline", key, lambda: read_pipeline(module, args, device, dtype))


def read_pipeline(module, args, device, dtype):
    folder = args.generator_path
    try:
        pipeline = module.LatentsToImagePipeline.from_folder(folder, dtype)
    except module.PipelineFolderError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # diffusers and transformers raise many kinds for broken configs or weights
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the Stable Diffusion pipeline in {folder}: {reason} "
                        f"(see {module.WEIGHTS_README})") from None
    pipeline.to(device)
    if args.sd_attention_slicing:
        pipeline.enable_attention_slicing()
    if args.sd_vae_tiling:
        pipeline.vae.enable_tiling()
    return pipeline


class StableDiffusionLatents:
    """Initial-noise-latent adapter. It holds the pipeline and the prompt embeddings, encoded once; nothing in it
    changes between rounds, so the server's checkpoints need none of it."""
    defaults = PaperDefaults(lamda=0.01, mu=100.0, server_lr=0.1)

    def __init__(self, pipeline, latent_shape, prompt, negative_prompt, steps, guidance_scale, rescale=True):
        self.pipeline = pipeline
        self.rescale = rescale
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.latent_shape = latent_shape
        self.latent_dim = math.prod(self.latent_shape)
        self.noise_sigma = pipeline.initial_noise_sigma(steps)
        self.embeddings = pipeline.embed_prompt(prompt, negative_prompt, guided=guidance_scale > 1)

    def sample_valid(self, n, generator):
        """Drawn on the CPU (the generator's device), so a seed gives the same latents on any device."""
        return (torch.randn(n, self.latent_dim, generator=generator) * self.noise_sigma).to(self.pipeline.device)

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


class ServerKTLStableDiffusion(ServerKTL):
    @classmethod
    def add_flags(cls, parser):
        group = parser.add_argument_group("FedKTL-stable-diffusion")
        group.add_argument("-prompt", "--stable_diffusion_prompt", default="a cat")
        group.add_argument("--sd_steps", type=int, default=50, help="Stable Diffusion: denoising steps per image")
        group.add_argument("--sd_guidance", type=float, default=7.5,
                           help="Stable Diffusion: classifier-free guidance scale (<= 1: no guidance)")
        group.add_argument("--sd_negative_prompt", default="", help="Stable Diffusion: negative prompt for guidance")
        group.add_argument("--sd_dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                           help="Stable Diffusion weights on CUDA (auto: float16); the CPU always uses float32")
        group.add_argument("--sd_resolution", type=int, default=0,
                           help="Stable Diffusion: image side in pixels, a multiple of 8 (0: the model's own, 512 for "
                                "v1.5); lower is faster and shrinks the latent")
        bool_flag(group, "-sdas", "--sd_attention_slicing", False,
                  "Stable Diffusion: attention slicing (less GPU memory)")
        bool_flag(group, "-sdvt", "--sd_vae_tiling", False, "Stable Diffusion: tiled VAE decoding (less GPU memory)")

    @classmethod
    def check_flags(cls, args):
        raise_first_failed([
            (args.sd_steps >= 1, f"--sd_steps must be >= 1, got {args.sd_steps}"),
            (args.sd_resolution >= 0, f"--sd_resolution must be >= 0 (0: the model's own), got {args.sd_resolution}"),
        ])

    def build_generator(self):
        args = self.args
        module = pipeline_module()
        if not args.generator_path:
            raise UserError(f"-algo FedKTL-stable-diffusion needs -GPath <diffusers Stable Diffusion folder>, "
                            f"e.g. -GPath stable-diffusion/v1.5 (see {module.WEIGHTS_README} to get the weights)")
        pipeline = load_pipeline(module, args, self.device, self.cache)
        resolution = args.sd_resolution or pipeline.default_resolution
        try:
            latent_shape = pipeline.latent_shape(resolution)
        except ValueError as exc:
            raise UserError(f"--sd_resolution: {exc}") from None
        adapter = StableDiffusionLatents(pipeline, latent_shape, args.stable_diffusion_prompt,
                                         args.sd_negative_prompt, args.sd_steps, args.sd_guidance,
                                         rescale=args.latent_rescale)
        tqdm.write(f"FedKTL: Stable Diffusion from {args.generator_path} ({pipeline.dtype}), "
                   f"{resolution}x{resolution} images, latent {latent_shape} (init sigma {adapter.noise_sigma:.3f}), "
                   f"{args.sd_steps} steps, guidance {args.sd_guidance}, prompt {args.stable_diffusion_prompt!r}")
        return adapter
