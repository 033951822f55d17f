"""Algorithms by name: each maps to the server class that runs it (imported only when chosen)."""
import importlib

from flcore.errors import UserError

ALGORITHMS = {
    "Local": "flcore.servers.serverlocal:ServerLocal",
    "FedKTL-stylegan-3": "flcore.servers.serverktl_stylegan_3:ServerKTLStyleGAN3",
    "FedKTL-stylegan-xl": "flcore.servers.serverktl_stylegan_xl:ServerKTLStyleGANXL",
    "FedKTL-stable-diffusion": "flcore.servers.serverktl_stable_diffusion:ServerKTLStableDiffusion",
    "FedDistill": "flcore.servers.serverdistill:ServerFedDistill",
    "FD": "flcore.servers.serverdistill:ServerFedDistill",
    "FML": "flcore.servers.serverfml:ServerFML",
    "LG-FedAvg": "flcore.servers.serverlg:ServerLG",
    "LG": "flcore.servers.serverlg:ServerLG",
    "FedGen": "flcore.servers.servergen:ServerFedGen",
    "FedProto": "flcore.servers.serverproto:ServerFedProto",
    "FedKD": "flcore.servers.serverkd:ServerFedKD",
    "FedGH": "flcore.servers.servergh:ServerFedGH",
    "FedTGP": "flcore.servers.servertgp:ServerFedTGP",
    "FedFTG": "flcore.servers.serverftg:ServerFedFTG",
    "FGL": "flcore.servers.serverfgl:ServerFGL",
}


def server_class(name):
    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm '{name}'; choose from: {', '.join(ALGORITHMS)}")
    module, cls = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def server_classes():
    """Every registered server class once (aliases share one), in registry order."""
    classes = []
    for name in ALGORITHMS:
        cls = server_class(name)
        if cls not in classes:
            classes.append(cls)
    return classes
