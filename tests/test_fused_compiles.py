"""The fused lm-head kernels compile for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter runs the kernels' arithmetic but not Triton's GPU compiler: typing, layouts
and shared memory are only checked here, so a first GPU run does not fail on them."""

import pytest

from oar_kernels import logprobs
from tests.helpers import assert_python_passes

COMPILE_ALL_CONFIGS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from oar_kernels import logprobs_fused as fused

assert not fused.INTERPRETED
SHARED_MEMORY = {80: 163 * 1024, 90: 227 * 1024}  # per block, A100 and H100
block_n, block_v = fused.BLOCKS["gpu"]
scalars = {"N": "i32", "V": "i32", "H": "i32", "R": "i32", "C": "i32", "tiles_per_split": "i32",
           "temperature": "fp32", "stride_hidden": "i32", "stride_weight": "i32",
           "stride_out": "i32", "targets_ptr": "*i64"}
for kernel in (fused._fused_fold_kernel, fused._fused_logits_grad_kernel):
    for dtype in ("bf16", "fp32"):
        for config in fused._TUNED:
            constexprs = {"HAS_BIAS": True, "WITH_ENTROPY": True, "BLOCK_N": block_n,
                          "BLOCK_V": block_v, "PRECISION": "tf32", **config.kwargs}
            signature = {}
            for name in kernel.arg_names:
                if name in constexprs:
                    signature[name] = "constexpr"
                elif name in scalars:
                    signature[name] = scalars[name]
                elif name in ("hidden_ptr", "weight_ptr", "bias_ptr", "out_ptr"):
                    signature[name] = "*" + dtype
                else:
                    signature[name] = "*fp32"
            for arch, limit in SHARED_MEMORY.items():
                compiled = triton.compile(
                    ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                )
                used = compiled.metadata.shared
                assert used <= limit, (kernel.__name__, dtype, config, arch, used)
"""


@pytest.mark.skipif(logprobs.triton is None, reason="triton is not installed")
def test_fused_kernels_compile_for_sm80_and_sm90():
    assert_python_passes(COMPILE_ALL_CONFIGS, TRITON_INTERPRET="0")
