"""Parameters as they travel between clients and server: detached copies by name, their averages and their size."""
import torch


def parameters_of(module):
    """Detached copies of a module's parameters by name: what a client uploads or a server sends."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def load_parameters(module, parameters):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(parameters[name])


def float_count(tensors):
    """Floats in a name -> tensor dict (integer buffers such as BatchNorm's step counter are not floats)."""
    return sum(t.numel() for t in tensors.values() if t.is_floating_point())


def weighted_average(parameter_dicts, weights):
    total = float(sum(weights))
    return {name: sum(d[name] * (w / total) for d, w in zip(parameter_dicts, weights))
            for name in parameter_dicts[0]}
