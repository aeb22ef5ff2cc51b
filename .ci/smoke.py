"""Smoke test of an installed wheel, run from outside the source tree (.ci/wheel): the
package, its C++ kernels (prebuilt or compiled on first use) and each op family work."""

import subprocess
import sys
from pathlib import Path

import torch

import oar_kernels as ok
from oar_kernels import _extension

here = Path(ok.__file__).resolve()
assert "site-packages" in here.parts, f"imported the checkout, not the wheel: {here}"
assert _extension.LOADED, _extension.STATUS
print("extension:", _extension.STATUS)

scores = torch.rand(2, 6)
mask = torch.ones(2, 6, dtype=torch.bool)
weighted = ok.reshape_advantages(torch.tensor([1.0, -1.0]), scores, mask)
assert weighted.shape == (2, 6) and torch.isfinite(weighted).all()

hidden = torch.randn(2, 3, 8, requires_grad=True)
head = torch.randn(50, 8, requires_grad=True)
targets = torch.randint(0, 50, (2, 3))
ok.token_logprobs(hidden, head, targets).sum().backward()
loss = ok.grpo_loss(hidden, head, targets, torch.tensor([0.5, -0.5]), mask[:, :3]).loss
loss.backward()
assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.grad).all()

# The reference loop's imports (transformers, tokenizers, yaml, tqdm) are declared deps.
from oar_kernels.grpo import task  # noqa: E402

tokenizer = task.build_tokenizer()
assert tokenizer.decode(tokenizer.encode("12+34=")) == "12+34="
for command in (["info"], ["train", "--help"], ["demo", "--help"], ["viz", "--help"]):
    done = subprocess.run([sys.executable, "-m", "oar_kernels", *command], capture_output=True)
    assert done.returncode == 0, (command, done.stderr.decode()[-2000:])
print("smoke: ok")
