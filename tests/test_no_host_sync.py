"""The hot paths read nothing back to the host (issue 12 item 5): on a GPU every read is a
sync per call, and an error inside CUDA graph capture (tests/test_cuda_graphs.py).

A TorchDispatchMode sees every aten call and fails on those that read values back:
token_logprobs forward and backward, grpo_loss (both walks) and reshape_advantages with
check_finite=False. Their value checks assert on the device on CUDA (logprobs.DEVICE_ASSERTS);
on CPU, where a read costs nothing, they raise ValueError, and these tests add "cpu" to the
device-assert devices to run the CUDA path without a GPU.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oar_kernels as ok
from oar_kernels import _extension, logprobs, reshape
from oar_kernels import loss as loss_module
from tests.helpers import assert_verbose_allclose, device_params, triton_device_or_skip

# aten calls whose result depends on tensor values on the host: .item() / bool() / int()
# (item, is_nonzero, _local_scalar_dense), and the ops whose output shape does.
HOST_READS = {
    torch.ops.aten.item.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.equal.default,
}


class HostReads(TorchDispatchMode):
    """Records the aten calls that read a value back to the host, inside the oar:: ops too.

    A mode is off while it handles a call, so the body of a custom op would be invisible: oar
    ops are run here through their device kernel with the mode back on."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            self.calls.append(str(func))
        if func.namespace != "oar":
            return func(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in leaves)
        key = torch._C.DispatchKey.CUDA if cuda else torch._C.DispatchKey.CPU
        with self:
            return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)


@pytest.fixture
def device_asserts(monkeypatch):
    """The CUDA path of the value checks (device-side asserts), on every device."""
    monkeypatch.setattr(logprobs, "DEVICE_ASSERTS", ("cpu", "cuda"))


def _lm_head(device, *, rows=12, width=8, vocab=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen).to(device)
    weight = (torch.randn(vocab, width, generator=gen) / width**0.5).to(device)
    bias = (torch.randn(vocab, generator=gen) * 0.1).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    return hidden, weight, bias, targets


def test_the_detector_sees_host_reads_inside_the_ops():
    hidden, weight, _, targets = _lm_head("cpu")
    with HostReads() as reads:
        torch.arange(4).nonzero()
        ok.token_logprobs(hidden, weight, targets)  # targets checked on the host on CPU
    assert reads.calls == ["aten.nonzero.default", "aten.is_nonzero.default"]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("with_entropy", [False, True])
def test_token_logprobs_reads_nothing_back(device, with_entropy, device_asserts, monkeypatch):
    monkeypatch.setitem(logprobs.CHUNK_BYTES, device, 4 * 37 * 5)  # several chunks
    monkeypatch.setattr(logprobs, "MIN_CHUNK_COLS", 1)
    hidden, weight, bias, targets = _lm_head(device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with HostReads() as reads:
        out = ok.token_logprobs(
            leaves[0],
            leaves[1],
            targets,
            bias=leaves[2],
            temperature=0.8,
            return_entropy=with_entropy,
        )
        total = (out[0] - out[1]).sum() if with_entropy else out.sum()
        grads = torch.autograd.grad(total, leaves)
    assert reads.calls == []
    monkeypatch.setattr(logprobs, "DEVICE_ASSERTS", ())  # host-side checks, same numbers
    want = ok.token_logprobs(
        *[t.clone().requires_grad_() for t in (hidden, weight)],
        targets,
        bias=bias,
        temperature=0.8,
        return_entropy=with_entropy,
    )
    got = out[0] if with_entropy else out
    assert_verbose_allclose(got, want[0] if with_entropy else want, rtol=0, atol=0, name="lp")
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("walk", ["one", "two"])
@pytest.mark.parametrize("device", device_params())
def test_grpo_loss_reads_nothing_back(device, walk, device_asserts, monkeypatch):
    monkeypatch.setattr(loss_module, "WALK", walk)
    monkeypatch.setitem(logprobs.CHUNK_BYTES, device, 4 * 37 * 5)  # several chunks
    monkeypatch.setattr(logprobs, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(logprobs, "MIN_CHUNK_COLS", 1)
    hidden, weight, bias, targets = _lm_head(device)
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(3, 4, generator=gen).to(device)
    mask = (torch.rand(3, 4, generator=gen) < 0.8).to(device)
    old = (torch.randn(3, 4, generator=gen) - 4).to(device)
    ref = old + 0.1
    leaves = [t.clone().requires_grad_() for t in (hidden.reshape(3, 4, -1), weight, bias)]
    with HostReads() as reads:
        out = ok.grpo_loss(
            leaves[0],
            leaves[1],
            targets.reshape(3, 4),
            advantages,
            mask,
            old_logprobs=old,
            ref_logprobs=ref,
            bias=leaves[2],
            beta=0.04,
            temperature=0.9,
        )
        grads = torch.autograd.grad(out.loss, leaves)
    assert reads.calls == []
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)


def test_targets_out_of_range_fail_on_the_device_path_too(device_asserts):
    # CPU only: on CUDA the failed device-side assert would poison the context for every
    # later test (it surfaces at the next sync as "device-side assert triggered").
    hidden, weight, _, targets = _lm_head("cpu")
    targets[3] = weight.shape[0]
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 37\)"):
        ok.token_logprobs(hidden, weight, targets)


@pytest.mark.parametrize("path", ["torch", "triton", "public"])
def test_reshape_without_finite_checks_reads_nothing_back(path):
    gen = torch.Generator().manual_seed(16)
    scores, mask = torch.rand(4, 64, generator=gen), torch.rand(4, 64, generator=gen) < 0.8
    advantages = torch.randn(4, generator=gen)
    if path == "triton":
        device = triton_device_or_skip(reshape.triton)
        scores, mask, advantages = scores.to(device), mask.to(device), advantages.to(device)

    def run(check_finite):
        out = torch.empty(scores.shape, device=scores.device)
        if path == "public":
            return ok.reshape_advantages(advantages, scores, mask, check_finite=check_finite)
        kernel = (
            reshape._bilevel_weights_torch if path == "torch" else reshape._bilevel_weights_triton
        )
        kernel(scores, mask, 0.25, 1.0, 0.1, True, check_finite, out=out)
        return reshape.weigh_advantages(advantages, out, check_finite)

    counts = {}
    for check_finite in (True, False):
        with HostReads() as reads:
            run(check_finite)
        counts[check_finite] = len(reads.calls)
    assert counts[False] == 0
    if path != "public" or not _extension.LOADED:  # the C++ kernel checks without a sync
        assert counts[True] > 0
    assert torch.equal(run(False), run(True))
