"""The CPU plug-in (cpu_kernels/) against the reference model it replaces parts of: same weights, same batch,
outputs and every gradient, dense and MoE, fp32 and bf16."""

from __future__ import annotations

import copy

import pytest
import torch

import cpu_kernels.loss
import cpu_kernels.moe
import model.loss
from cpu_kernels import apply_cpu_kernels
from model.llama import Transformer
from model.moe import MoEFeedForward
from tests.conftest import tiny_config
from tests.test_model import loss_batch, loss_terms, reference_loss_terms


def loss_and_grads(model: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(tokens[:, :-1], tokens[:, 1:])
    loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
    loss.backward()
    return {"loss": loss.detach().float(), **{n: p.grad.float() for n, p in model.named_parameters()}}


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm().clamp(min=1e-30))


# fp32: both compute the same sums in a different order, so they agree to fp32 rounding amplified by a few layers.
# bf16: every bf16 rounding is a relative 2^-9 on average (2^-8 at most), and the two models round in different
# places (the plug-in keeps the loss's probabilities, RMSNorm's row factors and the attention scores in bf16, the
# reference rounds the fp32 softmax results once), so they are compared through an fp64 copy of the same model:
# the plug-in's error against it must stay within twice the reference's own error plus one bf16 rounding (2^-8).
# Gradients that are small sums of cancelling terms (the MoE router's) carry errors of several percent in both.
FP32_TOLERANCE = 1e-5


def assert_as_accurate(ours: dict, ref: dict, exact: dict) -> None:
    for name in ref:
        exact_value = exact[name].float()
        assert relative_error(ours[name], exact_value) < 2 * relative_error(ref[name], exact_value) + 2**-8, name


# Whole models in bf16 are compared dense only: in a bf16 MoE at init the router's probabilities are close to
# uniform, so the different roundings upstream send some tokens to other experts in each model (and in the fp64
# copy), and the gradients then differ by that choice, not by arithmetic. The MoE layer is compared on its own below,
# where all three route the same input the same way.
@pytest.mark.parametrize("num_experts, dtype", [(0, torch.float32), (4, torch.float32), (0, torch.bfloat16)], ids=str)
def test_plugged_in_model_equals_the_reference(num_experts, dtype):
    torch.manual_seed(0)
    reference = Transformer(tiny_config(num_experts=num_experts)).to(dtype)
    plugged = apply_cpu_kernels(copy.deepcopy(reference))
    exact = copy.deepcopy(reference).double()  # the same (rounded) weights, computed in fp64
    tokens = torch.randint(0, 512, (2, 33))
    ref = loss_and_grads(reference, tokens)
    ours = loss_and_grads(plugged, tokens)
    assert ours.keys() == ref.keys()
    if dtype == torch.float32:
        for name in ref:
            assert relative_error(ours[name], ref[name]) < FP32_TOLERANCE, name
        return
    assert_as_accurate(ours, ref, loss_and_grads(exact, tokens))


def moe_outputs_and_grads(layer: MoEFeedForward, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    out, stats = layer(x)
    (out * dy).sum().backward()
    grads = {n: p.grad.float() for n, p in layer.named_parameters()}
    return {"out": out.detach().float(), "dx": x.grad.float(), "load": stats.load_E, **grads}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plugged_in_moe_layer_equals_the_reference(dtype):
    """Dispatch, looped experts (rows padded to 64 in bf16) and combine of the plug-in against the reference's."""
    torch.manual_seed(0)
    reference = MoEFeedForward(tiny_config(num_experts=4))
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.1)
    reference = reference.to(dtype)
    plugged = copy.deepcopy(reference)
    plugged.sparse_ffn_fn = cpu_kernels.moe.sparse_ffn
    x, dy = torch.randn(2, 37, 64).to(dtype), torch.randn(2, 37, 64).to(dtype)
    ref, ours = moe_outputs_and_grads(reference, x, dy), moe_outputs_and_grads(plugged, x, dy)
    if dtype == torch.float32:
        for name in ref:
            assert relative_error(ours[name], ref[name]) < FP32_TOLERANCE, name
        return
    exact = moe_outputs_and_grads(copy.deepcopy(reference).double(), x.double(), dy.double())
    assert_as_accurate(ours, ref, exact)


def test_plug_in_swaps_every_fast_path_and_leaves_explicit_sdpa_alone():
    model = apply_cpu_kernels(Transformer(tiny_config(num_experts=4, attention="sdpa")))
    block = model.layers[0]
    assert model.loss_fn.__module__ == "cpu_kernels.loss"
    assert block.attn_norm.norm_fn.__module__ == "cpu_kernels.norm"
    assert block.ffn.sparse_ffn_fn.__module__ == "cpu_kernels.moe"
    assert block.attn.attend_fn.__module__ == "model.attention"


def test_plug_in_leaves_out_the_paths_not_named():
    """bench/cpu_kernels.py measures each path by leaving it out: its reference must run in its place."""
    reference = Transformer(tiny_config(num_experts=4))
    model = apply_cpu_kernels(Transformer(tiny_config(num_experts=4)), paths=["norm", "attention"])
    block, reference_block = model.layers[0], reference.layers[0]
    assert model.loss_fn is reference.loss_fn
    assert block.attn_norm.norm_fn.__module__ == "cpu_kernels.norm"
    assert block.attn.attend_fn.__module__ == "cpu_kernels.attention"
    assert block.ffn.sparse_ffn_fn is reference_block.ffn.sparse_ffn_fn


@pytest.fixture
def three_chunks(monkeypatch):
    """Both losses in 3 chunks of 40, 40 and 20 rows (tests.test_model.loss_batch has 100)."""
    monkeypatch.setattr("cpu_kernels.loss.MIN_CHUNK_ROWS", 40)
    monkeypatch.setattr("cpu_kernels.loss.CHUNK_ELEMENTS", 0)
    monkeypatch.setattr("model.loss.CHUNK_LOGITS", 40 * 300)


@pytest.mark.parametrize("coef", [0.0, 0.1], ids=["no-z", "z0.1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_loss_equals_the_reference(dtype, coef, three_chunks):
    """The plug-in's loss (probabilities in the logits' dtype, weight gradient summed in it) against the reference's
    (fp32 softmax and accumulation), over several chunks with ignored rows, with and without an output z-loss
    large enough (0.1) to change the gradients by more than the tolerance. fp32: to rounding. bf16: cross-entropy
    and gradients within 2% (a few bf16 roundings of each gradient entry; the plug-in's bf16 p - 1 is only this
    close while no target is confident, which test_model.py's confident-target test shows the reference handles).

    log²Z in bf16: the plug-in takes log Z as the target's logit minus log p of the target, p rounded to bf16
    (relative error 2^-8 at most, so log Z is off by 2^-8 at most), where the reference takes logsumexp of the
    same bf16 logits in fp32; log²Z is then off by 2 |log Z| 2^-8 + 2^-16 at most, and so is its mean."""
    h, w, t = loss_batch(dtype)
    ref = loss_terms(model.loss.linear_cross_entropy, h, w, t, coef)
    ours = loss_terms(cpu_kernels.loss.linear_cross_entropy, h, w, t, coef)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name in ("loss", "h", "w"):
        torch.testing.assert_close(ours[name], ref[name], atol=tol, rtol=tol, msg=name)
    if dtype == torch.float32:
        torch.testing.assert_close(ours["z"], ref["z"], atol=tol, rtol=tol)
        return
    lse = torch.logsumexp((h @ w.t()).float(), dim=-1)[t != -100]
    assert (ours["z"] - ref["z"]).abs() <= 2 * lse.abs().mean() * 2**-8 + 2**-16


def test_cpu_loss_keeps_a_small_z_loss_gradient_unbiased_in_bf16(three_chunks):
    """At PaLM's 1e-4 the z-loss moves each bf16 gradient entry by less than one bf16 rounding, so it survives only
    on average: each rounding must be of a product that carries it (the row factor 1 + 2c log Z ~ 1.001 rounded
    to bf16 on its own becomes 1, and the plug-in then kept a sixth of it). Over 16 batches, the head weight's
    gradient change from the z-loss, projected on the exact (fp64) change, averages 1 within its noise."""
    ratios = []
    for seed in range(16):
        torch.manual_seed(seed)
        h, w = torch.randn(100, 32).bfloat16(), (torch.randn(300, 32) * 0.2).bfloat16()
        t = torch.randint(0, 300, (100,))
        exact = reference_loss_terms(h, w, t, 1e-4)["w"] - reference_loss_terms(h, w, t, 0.0)["w"]
        fn = cpu_kernels.loss.linear_cross_entropy
        change = loss_terms(fn, h, w, t, 1e-4)["w"].double() - loss_terms(fn, h, w, t, 0.0)["w"].double()
        ratios.append(float((change * exact).sum() / exact.square().sum()))
    assert abs(sum(ratios) / len(ratios) - 1) < 0.2, ratios
