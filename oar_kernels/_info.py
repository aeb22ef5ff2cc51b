"""What is installed and which kernel each op runs on each device."""

import platform
from importlib import metadata

import torch

from oar_kernels import _extension, logprobs, loss, reshape
from oar_kernels.importance import gradient


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def backends() -> dict[str, dict[str, str]]:
    """{op name: {device: backend}} for every registered op."""
    families = {
        "bilevel_weights": reshape,
        "reshape_advantages": reshape,
        "token_logprobs": logprobs,
        "grpo_loss": loss,
        "saliency": gradient,
    }
    has_cuda = torch.cuda.is_available()
    table = {
        op: {"cpu": module.CPU_BACKEND, "cuda": module.CUDA_BACKEND}
        for op, module in families.items()
    }
    # The lm-head ops follow OAR_KERNELS_LOGPROB_BACKEND (grpo_loss walks the same kernels).
    for device in ("cpu", "cuda"):
        table["token_logprobs"][device] = logprobs.backend_name(device)
        table["grpo_loss"][device] = "fused loss: " + logprobs.backend_name(device)
    if not has_cuda:
        for per_device in table.values():
            per_device["cuda"] = "no CUDA device"
    return table


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "unavailable"


def report() -> str:
    lines = [
        f"oar-kernels {_version('oar-kernels')}",
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__}",
        f"triton      {_version('triton')}",
        f"numpy       {_version('numpy')}",
        f"cuda        {_device_name()}",
        f"extension   {_extension.STATUS}",
        f"lm head     {logprobs.logprob_backend()} ({logprobs.BACKEND_VARIABLE}: "
        f"{' or '.join(logprobs.LOGPROB_BACKENDS)}; fused runs on CUDA)",
        "ops:",
    ]
    for op, per_device in backends().items():
        lines.append(f"  oar::{op:<20} cpu: {per_device['cpu']:<34} cuda: {per_device['cuda']}")
    return "\n".join(lines)


def info() -> None:
    """Prints versions, whether the C++ extension loaded, and each op's backend per device."""
    print(report())
