"""FedKTL with Stable Diffusion (the paper's Table 8): the loop of serverktl.py rendering with the Stable Diffusion
pipeline of -GPath (flcore/generators/stable_diffusion.py), with the paper's hyperparameters for it."""
from dataclasses import dataclass

from flcore.generators.stable_diffusion import STABLE_DIFFUSION
from flcore.servers.serverktl import LAMDA_HELP, MU_HELP, SLR_HELP, FedKTLSettings, ServerKTL
from flcore.settings import option


@dataclass(frozen=True)
class FedKTLStableDiffusionSettings(FedKTLSettings):
    title = "FedKTL-stable-diffusion"
    auto_generators = ("stable-diffusion",)
    auto_without_path = "stable-diffusion"
    lamda: float = option(STABLE_DIFFUSION.defaults.lamda, "-lam", "--lamda", help=LAMDA_HELP)
    mu: float = option(STABLE_DIFFUSION.defaults.mu, "-mu", "--mu", help=MU_HELP)
    server_learning_rate: float = option(STABLE_DIFFUSION.defaults.server_lr, "-slr", "--server_learning_rate",
                                         help=SLR_HELP)


class ServerKTLStableDiffusion(ServerKTL):
    Settings = FedKTLStableDiffusionSettings
