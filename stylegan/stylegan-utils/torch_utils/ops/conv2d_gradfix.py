"""conv2d and conv_transpose2d under the names NVIDIA's network code calls. NVIDIA's versions
replaced PyTorch's backward pass to get second-order gradients on old PyTorch; current PyTorch
differentiates these ops to any order itself."""
import torch.nn.functional as F


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d (the keyword names are the ones network code passes)."""
    return F.conv2d(input=input, weight=weight, bias=bias, stride=stride, padding=padding,
                    dilation=dilation, groups=groups)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """torch.nn.functional.conv_transpose2d (the keyword names are the ones network code passes)."""
    return F.conv_transpose2d(input=input, weight=weight, bias=bias, stride=stride, padding=padding,
                              output_padding=output_padding, groups=groups, dilation=dilation)
