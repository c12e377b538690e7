"""Mixture of experts against a naive per-token reference, its losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.llama import count_parameters
from model.moe import MoEFeedForward, Routing, expert_counts, route, router_stats
from tests.conftest import read_metrics, run_train, tiny_config, train_losses
from training.config import model_preset


def naive_moe(ffn: MoEFeedForward, x_ND: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax over all experts, top-k, renormalise, weighted sum of the chosen experts."""
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        probs = (x_ND[n].double() @ ffn.router.weight.double().t()).softmax(-1)
        top, experts = probs.topk(ffn.top_k)
        for weight, e in zip(top / top.sum(), experts.tolist()):
            x = x_ND[n].double()
            h = F.silu(ffn.gate_proj[e].double() @ x) * (ffn.up_proj[e].double() @ x)
            out[n] += (weight * (ffn.down_proj[e].double() @ h)).to(out.dtype)
    return out


def make_ffn(num_experts=8, top_k=2, seed=0) -> MoEFeedForward:
    torch.manual_seed(seed)
    ffn = MoEFeedForward(tiny_config(num_experts=num_experts, top_k=top_k))
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return ffn


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routing_and_output_equal_naive_reference(top_k):
    ffn = make_ffn(top_k=top_k)
    x = torch.randn(2, 20, 64)
    out, _ = ffn(x)
    torch.testing.assert_close(out, naive_moe(ffn, x.view(-1, 64)).view_as(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouped", [False, True])
def test_both_expert_paths_equal_naive_reference(grouped):
    """The looped experts, and the grouped ones with every expert's rows padded to a multiple of 16."""
    ffn = make_ffn()
    ffn.grouped_mm = grouped
    x = torch.randn(2, 21, 64, requires_grad=True)
    out, _ = ffn(x)
    torch.testing.assert_close(out, naive_moe(ffn, x.detach().view(-1, 64)).view_as(x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and ffn.gate_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_equal_naive_reference(top_k, grouped):
    """Dispatch and combine, padding rows included, against autograd through the token-by-token reference:
    gradients of the input, the router and every expert."""
    ffn = make_ffn(top_k=top_k)
    ffn.grouped_mm = grouped
    x = torch.randn(2, 21, 64, requires_grad=True)
    dy = torch.randn(2, 21, 64)
    ffn(x)[0].backward(dy)
    ours = [x.grad, *(p.grad for p in ffn.parameters())]
    x.grad = None
    ffn.zero_grad()
    naive_moe(ffn, x.view(-1, 64)).backward(dy.view(-1, 64))
    for mine, ref in zip(ours, [x.grad, *(p.grad for p in ffn.parameters())], strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)  # fp32 against the fp64 reference


def test_gradients_reach_router_and_every_selected_expert():
    ffn = make_ffn()
    x = torch.randn(4, 16, 64)
    out, stats = ffn(x)
    (out.square().mean() + stats.balance_loss + stats.z_loss).backward()
    assert ffn.router.weight.grad.abs().sum() > 0
    chosen = route(x.view(-1, 64), ffn.router.weight, ffn.top_k).experts_NK.unique().tolist()
    for e in range(8):
        used = ffn.gate_proj.grad[e].abs().sum() > 0
        assert used == (e in chosen), e
        assert (ffn.down_proj.grad[e].abs().sum() > 0) == (e in chosen)


def test_balance_loss_on_a_hand_computed_example():
    # 2 experts, top-1, 2 tokens: both go to expert 0. f = (1, 0); P = mean of (0.8, 0.2) and (0.6, 0.4) = (0.7, 0.3).
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    logits = probs.log()
    routing = Routing(logits, probs, torch.ones(2, 1), torch.tensor([[0], [0]]))
    stats = router_stats(routing, torch.tensor([2, 0]))
    assert stats.balance_loss.item() == pytest.approx(2 * (1.0 * 0.7 + 0.0 * 0.3))
    torch.testing.assert_close(stats.load_E, torch.tensor([1.0, 0.0]))


def test_balance_loss_is_one_for_a_uniform_router():
    """Normalisation: f_e counts routed slots (N x top_k), so a perfectly balanced router scores exactly 1.0
    (transformers' Mixtral formula gives top_k for the same router)."""
    E, k, N = 8, 2, 64
    probs = torch.full((N, E), 1.0 / E)
    experts = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], dim=1)
    routing = Routing(probs.log(), probs, torch.full((N, k), 0.5), experts)
    stats = router_stats(routing, expert_counts(experts, E))
    assert stats.balance_loss.item() == pytest.approx(1.0)


def test_z_loss_on_a_hand_computed_example():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2 and log 4
    probs = logits.softmax(-1)
    routing = Routing(logits, probs, torch.ones(2, 1), probs.argmax(-1, keepdim=True))
    stats = router_stats(routing, torch.tensor([1, 1]))
    assert stats.z_loss.item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_moe_parameter_counts():
    total, active = count_parameters(model_preset("tinyllama-1.1b-moe"))
    assert total == 6_429_272_064 and active == 1_861_675_008
    tiny_total, tiny_active = count_parameters(model_preset("tiny-moe"))
    expert = 3 * 256 * 688
    assert tiny_total - tiny_active == 4 * 6 * expert  # 6 of 8 experts idle per token, 4 layers


MOE_RUN = ["--max_steps=12", "--eval_every=0", "--model.num_experts=4", "--model.top_k=2"]


@pytest.fixture(scope="module")
def moe_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    run_train([f"--data={dataset}", f"--out_dir={out}", *MOE_RUN])
    return out


def test_moe_run_loss_falls_and_logs_router_losses(moe_run):
    losses = train_losses(moe_run)
    assert losses[12] < losses[1] - 0.5
    last = [r for r in read_metrics(moe_run) if "loss" in r][-1]
    assert {"aux_loss", "balance_loss", "z_loss", "expert_load"} <= set(last)
    assert len(last["expert_load"]) == 2 and sum(last["expert_load"][0]) == pytest.approx(1.0)


def test_moe_under_two_process_fsdp_with_activation_checkpointing(moe_run, dataset, tmp_path):
    two_processes = ["--devices=2", "--activation_checkpointing=full"]
    run_train([f"--data={dataset}", f"--out_dir={tmp_path}", *MOE_RUN, *two_processes])
    one, two = train_losses(moe_run), train_losses(tmp_path)
    assert one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4)
