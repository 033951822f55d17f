"""How a model's BatchNorm layers treat a batch that is not the client's own data (FedKTL's generated images).

In training mode a BatchNorm layer normalizes with the batch's statistics and folds them into its running
statistics, which evaluation then uses. A forward of generated images therefore shifts the running statistics
towards generated-image statistics, and real test images are normalized with the wrong ones. The helpers here
leave the running statistics alone, or give the other batch a BatchNorm of its own. Models without BatchNorm
(LayerNorm, GroupNorm) have no running statistics, so every mode is the plain forward for them.
"""
from contextlib import contextmanager

from torch import nn
from torch.func import functional_call

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(module):
    """(qualified name, layer) of every BatchNorm layer in `module` that tracks running statistics."""
    return [(name, layer) for name, layer in module.named_modules()
            if isinstance(layer, BATCHNORM_TYPES) and layer.track_running_stats]


@contextmanager
def running_stats_untouched(module):
    """Inside, BatchNorm layers in training mode normalize with batch statistics and neither update their running
    statistics nor count the batch; in eval mode they use the running statistics as usual."""
    layers = [layer for _, layer in batchnorm_layers(module)]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


class AuxiliaryBatchNorm(nn.Module):
    """A second set of BatchNorm affine parameters and running statistics for `module` (auxiliary BN, as in
    AdvProp): `forward(x)` runs `module` with every BatchNorm layer swapped for its auxiliary copy, so the other
    layers are shared and trained by both kinds of batches while each kind has its own normalization. Copies
    start from the layers' values at construction."""

    def __init__(self, module):
        super().__init__()
        self.module = [module]  # a list, so the shared module is not registered (and saved) twice
        self.names = []
        self.affine = nn.ParameterList()
        self.statistics = []
        for prefix, layer in batchnorm_layers(module):
            for name, parameter in layer.named_parameters(recurse=False):
                self.names.append(f"{prefix}.{name}")
                self.affine.append(nn.Parameter(parameter.detach().clone()))
            for name, buffer in layer.named_buffers(recurse=False):
                buffer_name = f"stat_{len(self.statistics)}"
                self.register_buffer(buffer_name, buffer.detach().clone())
                self.statistics.append((f"{prefix}.{name}", buffer_name))

    def replacements(self):
        tensors = dict(zip(self.names, self.affine))
        tensors.update({name: getattr(self, buffer_name) for name, buffer_name in self.statistics})
        return tensors

    def forward(self, x):
        # BatchNorm updates the running statistics it is given in place, so the auxiliary buffers learn.
        return functional_call(self.module[0], self.replacements(), (x,))
