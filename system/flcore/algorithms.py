"""Algorithms by name: each maps to the server class that runs it (imported only when chosen)."""
import importlib

from flcore.errors import UserError

ALGORITHMS = {
    "Local": "flcore.servers.serverlocal:ServerLocal",
    "FedKTL-stylegan-3": "flcore.servers.serverktl_stylegan_3:ServerKTLStyleGAN3",
    "FedKTL-stylegan-xl": "flcore.servers.serverktl_stylegan_xl:ServerKTLStyleGANXL",
}


def server_class(name):
    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm '{name}'; choose from: {', '.join(ALGORITHMS)}")
    module, cls = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(module), cls)
