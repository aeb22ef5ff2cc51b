import os

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. The variable
# must be set before triton (imported by oar_kernels) decorates any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
