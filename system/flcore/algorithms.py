"""Algorithms by name: each maps to the server class that runs it. The built-in ones are imported here, so the
import graph is the real one; `register` adds another (a user's algorithm registers itself when its module is
imported, e.g. with main.py's --import)."""
from flcore.errors import UserError
from flcore.servers.serverdistill import ServerFedDistill
from flcore.servers.serverfgl import ServerFGL
from flcore.servers.serverfml import ServerFML
from flcore.servers.serverftg import ServerFedFTG
from flcore.servers.servergen import ServerFedGen
from flcore.servers.servergh import ServerFedGH
from flcore.servers.serverkd import ServerFedKD
from flcore.servers.serverktl_stable_diffusion import ServerKTLStableDiffusion
from flcore.servers.serverktl_stylegan_3 import ServerKTLStyleGAN3
from flcore.servers.serverktl_stylegan_xl import ServerKTLStyleGANXL
from flcore.servers.serverl2g import ServerFedL2GFeat, ServerFedL2GLogit
from flcore.servers.serverlg import ServerLG
from flcore.servers.serverlocal import ServerLocal
from flcore.servers.servermrl import ServerFedMRL
from flcore.servers.serverproto import ServerFedProto
from flcore.servers.servertgp import ServerFedTGP

ALGORITHMS = {
    "Local": ServerLocal,
    "FedKTL-stylegan-3": ServerKTLStyleGAN3,
    "FedKTL-stylegan-xl": ServerKTLStyleGANXL,
    "FedKTL-stable-diffusion": ServerKTLStableDiffusion,
    "FedDistill": ServerFedDistill,
    "FD": ServerFedDistill,
    "FML": ServerFML,
    "LG-FedAvg": ServerLG,
    "LG": ServerLG,
    "FedGen": ServerFedGen,
    "FedProto": ServerFedProto,
    "FedKD": ServerFedKD,
    "FedGH": ServerFedGH,
    "FedTGP": ServerFedTGP,
    "FedFTG": ServerFedFTG,
    "FGL": ServerFGL,
    "FedL2G-feat": ServerFedL2GFeat,
    "FedL2G-logit": ServerFedL2GLogit,
    "FedMRL": ServerFedMRL,
}


def register(name, server_cls):
    """Makes `-algo name` run `server_cls` (a flcore.servers.serverbase.Server subclass with its Settings)."""
    if name in ALGORITHMS and ALGORITHMS[name] is not server_cls:
        raise ValueError(f"algorithm name '{name}' is taken by {ALGORITHMS[name].__name__}")
    ALGORITHMS[name] = server_cls
    return server_cls


def server_class(name):
    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm '{name}'; choose from: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def server_classes():
    """Every registered server class once (aliases share one), in registry order."""
    return list(dict.fromkeys(ALGORITHMS.values()))
