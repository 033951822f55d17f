"""FedKTL with a StyleGAN2/StyleGAN3 generator (-algo FedKTL-stylegan-3, the default): the loop of serverktl.py with
the paper's StyleGAN3 hyperparameters (FedKTLSettings' defaults). Which generator renders is -gen's choice
(flcore/generators/registry.py); by default a StyleGAN pickle or DCGAN checkpoint in -GPath, else the face DCGAN."""
from flcore.servers.serverktl import ServerKTL


class ServerKTLStyleGAN3(ServerKTL):
    """FedKTL as the paper runs it with StyleGAN3 (FedKTLSettings' defaults)."""
