"""What algorithms that average one shared architecture (FedFTG, FGL) exchange: the model's floating-point state,
its sample-weighted average, and the check that every client holds the same architecture."""
import torch

from flcore.errors import UserError
from flcore.trainmodel import family_models


def single_model_name(family, algorithm):
    """The one model name of `-m family`; a UserError when the family mixes architectures, which cannot be
    averaged."""
    try:
        names = family_models(family)
    except ValueError as exc:
        raise UserError(f"-m: {exc}") from None
    if len(set(names)) > 1:
        raise UserError(f"-algo {algorithm} averages one model architecture, but -m {family} mixes {len(set(names))}; "
                        f"pass -m <one model name>, e.g. -m {names[0]}")
    return names[0]


def shared_state(module):
    """Detached copies of the module's floating-point state (parameters and BatchNorm running statistics, as FedAvg
    averages them); integer buffers such as BatchNorm's step counter stay with each model."""
    return {name: t.detach().clone() for name, t in module.state_dict().items() if t.is_floating_point()}


def load_shared_state(module, state):
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name in state:
                t.copy_(state[name])
