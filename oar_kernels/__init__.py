"""oar-kernels: fused kernels for Outcome-grounded Advantage Reshaping (OAR) in GRPO.

    import oar_kernels as ok
    per_token = ok.reshape_advantages(advantages, scores, score_mask)

The README has the math and examples; `oar_kernels.info()` lists the active backends.
"""

import importlib

__version__ = "0.1.0"
# Where each public name lives. They are imported on first use (PEP 562), and all at once,
# so `import oar_kernels` costs nothing until then: the `oar-kernels` command reads its
# flags (and answers --help) without importing torch, which takes seconds.
_HOMES = {
    "GRPOLoss": "oar_kernels.loss",
    "OARAdvantages": "oar_kernels.pipeline",
    "bilevel_weights": "oar_kernels.reshape",
    "gradient_importance": "oar_kernels.importance",
    "grpo_loss": "oar_kernels.loss",
    "info": "oar_kernels._info",
    "oar_advantages": "oar_kernels.pipeline",
    "perturbation_importance": "oar_kernels.importance",
    "reshape_advantages": "oar_kernels.reshape",
    "spans": None,  # a module
    "token_logprobs": "oar_kernels.logprobs",
}
__all__ = [*_HOMES, "__version__"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module("oar_kernels._extension")  # schemas, then the C++ kernels
    for public, home in _HOMES.items():
        module = importlib.import_module(home or f"{__name__}.{public}")
        globals()[public] = module if home is None else getattr(module, public)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
