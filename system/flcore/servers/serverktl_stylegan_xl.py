"""FedKTL with StyleGAN-XL (the paper's default): as StyleGAN3, but class-conditional (valid latents are mapped with
random one-hot ImageNet labels, flcore/generators/stylegan.py), with the paper's StyleGAN-XL hyperparameters."""
from dataclasses import dataclass

from flcore.generators.stylegan import STYLEGAN_XL
from flcore.servers.serverktl import LAMDA_HELP, MU_HELP, SLR_HELP, FedKTLSettings
from flcore.servers.serverktl_stylegan_3 import ServerKTLStyleGAN3
from flcore.settings import option


@dataclass(frozen=True)
class FedKTLStyleGANXLSettings(FedKTLSettings):
    title = "FedKTL-stylegan-xl"
    auto_generators = ("dcgan", "stylegan-xl")
    lamda: float = option(STYLEGAN_XL.defaults.lamda, "-lam", "--lamda", help=LAMDA_HELP)
    mu: float = option(STYLEGAN_XL.defaults.mu, "-mu", "--mu", help=MU_HELP)
    server_learning_rate: float = option(STYLEGAN_XL.defaults.server_lr, "-slr", "--server_learning_rate",
                                         help=SLR_HELP)


class ServerKTLStyleGANXL(ServerKTLStyleGAN3):
    Settings = FedKTLStyleGANXLSettings
