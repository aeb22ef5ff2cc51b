"""What every Triton launch in the package needs, defined once: the optional import, whether
the interpreter is on, and the CUDA device guard."""

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux x86_64 only; CUDA then takes the torch paths
    triton = tl = None

# Under TRITON_INTERPRET=1 (no GPU) the kernels run on CPU tensors: that is how they are
# tested. Triton reads the variable when it decorates the kernels, i.e. at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def on_device_of(tensor: torch.Tensor):
    """Context for a launch: Triton launches on the current CUDA device, and pointers of
    another device (a tensor on cuda:1 while cuda:0 is current) would fault there."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
