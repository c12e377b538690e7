"""The grouped-matmul expert path (torch._grouped_mm, used on Hopper GPUs and by the reference on a CPU) against
the looped one, on the CPU, where torch also has the kernel."""

from __future__ import annotations

import copy

import pytest
import torch

from model.moe import MoEFeedForward, experts_grouped, experts_looped
from tests.conftest import tiny_config
from training.setup import grouped_mm_fits

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")


def forward_backward(fn, tensors: list[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_match_looped_including_an_expert_without_tokens(dtype):
    counts = [5, 0, 11, 16]
    g = torch.Generator().manual_seed(0)
    x, dout = (torch.randn(32, 64, generator=g).to(dtype) for _ in range(2))
    gate, up = (torch.randn(4, 96, 64, generator=g).to(dtype) * 0.1 for _ in range(2))
    down = torch.randn(4, 64, 96, generator=g).to(dtype) * 0.1
    looped = forward_backward(lambda *t: experts_looped(t[0], torch.tensor(counts), *t[1:]), [x, gate, up, down], dout)
    grouped = forward_backward(
        lambda *t: experts_grouped(t[0], torch.tensor(counts), *t[1:]), [x, gate, up, down], dout
    )
    for a, b in zip(looped, grouped):
        # In bf16 the paths round the input gradient's two matmul terms in a different order: one bf16 step of
        # the largest value apart at most.
        atol = float(b.abs().max()) * 2**-7 if dtype == torch.bfloat16 else None
        torch.testing.assert_close(a, b, atol=atol, rtol=None if atol is None else 1.6e-2)
    assert all(float(grad[1].abs().max()) == 0 for grad in grouped[2:])  # expert 1 saw no token


def test_moe_layer_gives_the_same_outputs_and_gradients_on_both_paths():
    torch.manual_seed(0)
    layer = MoEFeedForward(tiny_config(num_experts=8, top_k=2))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(1)
    x, dout = (torch.randn(2, 24, 64, generator=g) for _ in range(2))
    results = []
    for grouped in (False, True):
        copy_ = copy.deepcopy(layer)
        copy_.grouped_mm = grouped
        params = [copy_.router.weight, copy_.gate_proj, copy_.up_proj, copy_.down_proj]
        xi = x.clone().requires_grad_()
        copy_(xi)[0].backward(dout)
        results.append([xi.grad, *(p.grad for p in params)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_grouped_mm_is_chosen_for_bf16_on_a_cpu_and_on_hopper_only(monkeypatch):
    cpu = torch.device("cpu")
    assert grouped_mm_fits(cpu, torch.bfloat16) and not grouped_mm_fits(cpu, torch.float32)
    cuda = torch.device("cuda", 0)
    for capability, chosen in [((8, 0), False), ((9, 0), True), ((10, 0), False), ((12, 0), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert grouped_mm_fits(cuda, torch.bfloat16) == chosen, capability
        assert not grouped_mm_fits(cuda, torch.float32)
