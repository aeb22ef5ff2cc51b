"""token_logprobs: ours (chunked) vs full logits + log_softmax + gather, forward and
forward+backward; grpo_loss fused (its default walk, and each walk forced) vs the unfused TRL
formula on full logits; with the peak memory each adds (measured in a fresh process).

    pytest bench/test_bench_logprobs.py --benchmark-only

Run as a script, it times fwd+bwd of each implementation in turn, repeat after repeat (so a
busy machine slows all alike), on one torch thread, and prints each one's speedup over the
plain formula as the median and range over repeats (issue 12's CPU target: >= 1.0x):

    python3 -m bench.test_bench_logprobs [--repeats 7] [--dtypes float32,bfloat16]

(from the repository root, which puts tests/helpers.py on the path).
"""

import contextlib
import statistics
import time
from pathlib import Path

import pytest
import torch

import oar_kernels as ok
from tests.helpers import peak_bytes_in_subprocess, synchronized

CUDA = torch.cuda.is_available()
# CPU shapes are scaled down (2 cores); CUDA rows use the training shapes.
SHAPES = (
    [(16384, 4096, 151936), (2048, 1024, 32000)]
    if CUDA
    else [(2048, 256, 32000), (512, 256, 151936)]
)
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def full_logits(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def _loss_batch(hidden, targets):
    """A GRPO batch of 8 sequences over the benchmark's rows: fixed advantages, mask, old."""
    gen = torch.Generator(device=hidden.device).manual_seed(1)
    shape = (8, hidden.shape[0] // 8)
    advantages = torch.randn(shape, device=hidden.device, generator=gen)
    mask = torch.rand(shape, device=hidden.device, generator=gen) < 0.9
    old = torch.full(shape, -10.0, device=hidden.device) + torch.rand(
        shape, device=hidden.device, generator=gen
    )
    return hidden.reshape(*shape, -1), targets.reshape(shape), advantages, mask, old


def unfused_grpo_loss(hidden, weight, targets):
    """TRL's path: full logits, log_softmax, gather, clipped surrogate, grpo aggregation."""
    hidden, targets, advantages, mask, old = _loss_batch(hidden, targets)
    logps = full_logits(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1))
    ratio = torch.exp(logps.reshape(targets.shape) - old)
    per_token = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    m = mask.float()
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def fused_grpo_loss(hidden, weight, targets, walk="auto"):
    """ok.grpo_loss on the batch; walk forces grpo_loss's one walk or two (loss.WALK)."""
    from oar_kernels import loss

    hidden, targets, advantages, mask, old = _loss_batch(hidden, targets)
    default, loss.WALK = loss.WALK, walk
    try:
        return ok.grpo_loss(hidden, weight, targets, advantages, mask, old_logprobs=old).loss
    finally:
        loss.WALK = default


def trl_chunked(hidden, weight, targets):
    """TRL's ChunkedLogProbFunction as its GRPOTrainer calls it (vocab chunk 32768), logprobs
    only. Requires the `bench` extra (trl)."""
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ())[0]


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


IMPLS = {
    "full-logits": full_logits,
    "oar": ok.token_logprobs,
    "trl-chunked": trl_chunked,
    "loss-unfused": unfused_grpo_loss,
    "loss-oar-fused": fused_grpo_loss,
    "loss-oar-one-walk": lambda *args: fused_grpo_loss(*args, walk="one"),
    "loss-oar-two-walks": lambda *args: fused_grpo_loss(*args, walk="two"),
}
LOGPROB_IMPLS = [
    "full-logits",
    "oar",
    pytest.param(
        "trl-chunked",
        marks=pytest.mark.skipif(
            not _importable("trl"), reason="trl is not installed (pip install '.[bench]')"
        ),
    ),
]
LOSS_IMPLS = ["loss-unfused", "loss-oar-fused"]  # the script also times each walk


def peak_bytes(rows, width, vocab, impl):
    """Memory a fwd+bwd adds on top of its inputs, in a fresh process."""
    setup = f"""
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_bench_logprobs import IMPLS
dtype = torch.bfloat16 if {DEVICE!r} == "cuda" else torch.float32
hidden = torch.randn({rows}, {width}, device={DEVICE!r}, dtype=dtype, requires_grad=True)
weight = (torch.randn({vocab}, {width}, device={DEVICE!r}, dtype=dtype) / {width}**0.5)
weight.requires_grad_()
targets = torch.randint(0, {vocab}, ({rows},), device={DEVICE!r})
"""
    run = f"IMPLS[{impl!r}](hidden, weight, targets).sum().backward()"
    return peak_bytes_in_subprocess(setup, run, DEVICE)


@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize(
    "rows, width, vocab", SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in SHAPES]
)
def test_token_logprobs(benchmark, impl, backward, rows, width, vocab):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(rows, width, device=DEVICE, dtype=DTYPE, generator=gen)
    weight = torch.randn(vocab, width, device=DEVICE, dtype=DTYPE, generator=gen) / width**0.5
    targets = torch.randint(0, vocab, (rows,), device=DEVICE, generator=gen)
    hidden.requires_grad_(backward)
    weight.requires_grad_(backward)
    fn = IMPLS[impl]

    def step():
        out = fn(hidden, weight, targets)
        if backward:
            torch.autograd.grad(out.sum(), (hidden, weight))

    benchmark.group = f"logprobs {'fwd+bwd' if backward else 'fwd'} N={rows} H={width} V={vocab}"
    benchmark.extra_info.update(impl=impl, baseline=impl == "full-logits")
    if backward and not benchmark.disabled:
        benchmark.extra_info["peak_mb"] = peak_bytes(rows, width, vocab, impl) / 2**20
    timed = synchronized(step, DEVICE)
    timed()
    benchmark.pedantic(timed, rounds=3, warmup_rounds=0)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize(
    "rows, width, vocab", SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in SHAPES]
)
def test_grpo_loss(benchmark, impl, rows, width, vocab):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(rows, width, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_()
    weight = torch.randn(vocab, width, device=DEVICE, dtype=DTYPE, generator=gen) / width**0.5
    weight.requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=DEVICE, generator=gen)

    def step():
        torch.autograd.grad(IMPLS[impl](hidden, weight, targets), (hidden, weight))

    benchmark.group = f"grpo loss fwd+bwd N={rows} H={width} V={vocab}"
    benchmark.extra_info.update(impl=impl, baseline=impl == "loss-unfused")
    if not benchmark.disabled:
        benchmark.extra_info["peak_mb"] = peak_bytes(rows, width, vocab, impl) / 2**20
    timed = synchronized(step, DEVICE)
    timed()
    benchmark.pedantic(timed, rounds=3, warmup_rounds=0)


# ------------------------------------------------------------- interleaved ratios (script)

# CPU: the pytest shapes and a wider hidden size, where the GEMMs dominate.
SCRIPT_SHAPES = SHAPES if CUDA else SHAPES + [(1024, 1024, 32000)]
# Each group: the baseline first, then what is compared with it.
SCRIPT_GROUPS = {
    "token_logprobs": ["full-logits", "oar"],
    "grpo_loss": ["loss-unfused", "loss-oar-fused", "loss-oar-one-walk", "loss-oar-two-walks"],
}


def _seconds():
    """CPU: the process's CPU time (one torch thread; other processes on a shared machine
    then cost little). CUDA: wall time after a synchronize."""
    if not CUDA:
        return time.process_time()
    torch.cuda.synchronize()
    return time.perf_counter()


def interleaved_ratios(rows, width, vocab, dtype, names, repeats):
    """{name: [baseline time / its time, one per repeat]} for fwd+bwd, names[0] the baseline;
    every repeat runs each implementation once, in turn."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(rows, width, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(vocab, width, device=DEVICE, generator=gen) / width**0.5
    weight = weight.to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=DEVICE, generator=gen)
    times = {name: [] for name in names}
    for repeat in range(repeats + 1):  # the first round warms up
        for name in names:
            start = _seconds()
            torch.autograd.grad(IMPLS[name](hidden, weight, targets).sum(), (hidden, weight))
            if repeat:
                times[name].append(_seconds() - start)
    base = times[names[0]]
    return {name: [b / t for b, t in zip(base, times[name])] for name in names[1:]}, times


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{DEVICE}, {torch.get_num_threads()} thread(s), {args.repeats} interleaved repeats")
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for rows, width, vocab in SCRIPT_SHAPES:
            for group, names in SCRIPT_GROUPS.items():
                ratios, times = interleaved_ratios(rows, width, vocab, dtype, names, args.repeats)
                for name, values in ratios.items():
                    ms = statistics.median(times[name]) * 1e3
                    print(
                        f"{str(dtype)[6:]:<9} N={rows} H={width} V={vocab} {group:<15} "
                        f"{name:<20} {ms:8.0f} ms  {statistics.median(values):.2f}x "
                        f"[{min(values):.2f}, {max(values):.2f}]",
                        flush=True,
                    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
