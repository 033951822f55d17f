"""FedKTL with a StyleGAN2/StyleGAN3-style generator: the latent space is W, valid latents are
G.mapping(z, c)[:, 0] for z ~ N(0, I), and a latent is rendered by repeating it over G.num_ws."""
import torch
from tqdm import tqdm

from compact_stylegan import build_default_generator
from flcore.generators.adapter import PaperDefaults
from flcore.generators.dcgan import (
    FACE_DCGAN_INSTALL,
    DCGANLoadError,
    GaussianLatents,
    face_dcgan_weights_path,
    is_dcgan_checkpoint,
    load_dcgan_checkpoint,
)
from flcore.servers.serverktl import ServerKTL
from flcore.errors import UserError
from generator_io import GeneratorLoadError, load_generator_pickle


class StyleGANLatents:
    """W-space adapter for any generator with NVIDIA's interface (mapping, synthesis, num_ws, w_dim)."""

    def __init__(self, G, device, defaults):
        self.G = G.to(device).eval().requires_grad_(False)
        self.device = device
        self.latent_dim = G.w_dim
        self.defaults = defaults

    def labels(self, n, generator):
        """Random one-hot class labels for a class-conditional generator, None for an unconditional one."""
        if self.G.c_dim == 0:
            return None
        classes = torch.randint(self.G.c_dim, (n,), generator=generator)
        return torch.nn.functional.one_hot(classes, self.G.c_dim).float().to(self.device)

    def sample_valid(self, n, generator):
        z = torch.randn(n, self.G.z_dim, generator=generator).to(self.device)
        return self.G.mapping(z, self.labels(n, generator))[:, 0]

    def renderable(self, latents):
        """W latents render as they are (the paper)."""
        return latents

    def render(self, latents):
        ws = latents.to(self.device).unsqueeze(1).repeat(1, self.G.num_ws, 1)
        return self.G.synthesis(ws, noise_mode="const")


class ServerKTLStyleGAN3(ServerKTL):
    defaults = PaperDefaults(lamda=0.1, mu=50.0, server_lr=0.01)
    builtin_c_dim = 0
    weights_readme = "stylegan/stylegan-3-models/README.md"

    @classmethod
    def add_flags(cls, parser):
        group = parser.add_argument_group("FedKTL-stylegan-3, FedKTL-stylegan-xl")
        group.add_argument("-gen", "--generator", default="face-dcgan", choices=["face-dcgan", "untrained"],
                           help="FedKTL-stylegan-* without -GPath: the pre-trained face DCGAN of gan-face-generate "
                                "(falls back to untrained when it is not installed) or the untrained built-in "
                                "generator")

    def build_generator(self):
        path = self.args.generator_path
        if path and is_dcgan_checkpoint(path):
            return self.dcgan_adapter(path)
        if path:
            try:
                G = load_generator_pickle(path, device=self.device)
            except GeneratorLoadError as exc:
                raise UserError(str(exc)) from None
            return StyleGANLatents(G, self.device, self.defaults)
        if self.args.generator == "face-dcgan":
            weights = face_dcgan_weights_path()
            if weights is not None:
                tqdm.write(f"FedKTL: no -GPath given, so images come from the pre-trained face DCGAN ({weights}); "
                           f"-gen untrained selects the untrained built-in StyleGAN-style generator.")
                return self.dcgan_adapter(weights)
            tqdm.write(f"FedKTL: the pre-trained face generator is not installed ({FACE_DCGAN_INSTALL}); "
                       f"falling back to the untrained built-in generator.")
        channels, height, _ = self.dataset.image_shape
        G = build_default_generator(height, channels, c_dim=self.builtin_c_dim)
        tqdm.write(f"FedKTL: images come from an untrained built-in generator "
                   f"(random weights, no pre-trained knowledge); pass -GPath <generator .pkl> "
                   f"(see {self.weights_readme}) to use pretrained weights.")
        return StyleGANLatents(G, self.device, self.defaults)

    def dcgan_adapter(self, path):
        try:
            G = load_dcgan_checkpoint(path, device=self.device)
        except DCGANLoadError as exc:
            raise UserError(str(exc)) from None
        return GaussianLatents(G, self.device, self.defaults, rescale=self.args.latent_rescale)
