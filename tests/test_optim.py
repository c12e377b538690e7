"""training/optim.py: Muon against a plain implementation of the paper's formulas (one process, and FSDP2-sharded
over 4 gloo processes), against torch.optim.Muon, which parameters it takes, and the cosine and WSD schedules."""

from __future__ import annotations

import math

import pytest
import torch
from jsonargparse import ArgumentError

from model.llama import Transformer
from tests.conftest import run_module, tiny_config
from tests.test_train import free_port
from training.config import OptimConfig, parse_config, wsd_decay_steps
from training.optim import lr_at, make_optimizer, newton_schulz, set_lr

CPU = torch.device("cpu")


# A plain Muon, written from Jordan et al. (2024) and Moonlight (Liu et al. 2025), one matrix at a time:
#   B <- mu B + G;  U = G + mu B (Nesterov) or B;  O = NS5(U);  W <- W - lr wd W - lr 0.2 sqrt(max(m, n)) O,
# with NS5: X = U / |U|_F (on the wide orientation), then 5 times X <- a X + b (X X^T) X + c (X X^T)^2 X.


def plain_newton_schulz(u: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if u.shape[0] > u.shape[1] else x


class PlainMuon:
    def __init__(self, lr: float, weight_decay: float, momentum: float = 0.95, nesterov: bool = True) -> None:
        self.lr, self.wd, self.mu, self.nesterov = lr, weight_decay, momentum, nesterov
        self.buffers: dict[str, torch.Tensor] = {}

    def step(self, name: str, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The new value of matrix (or stack of matrices) `w` with gradient `g`."""
        buf = self.buffers[name] = self.mu * self.buffers.get(name, torch.zeros_like(g)) + g
        u = g + self.mu * buf if self.nesterov else buf
        matrices = [u] if u.ndim == 2 else list(u)
        o = torch.stack([plain_newton_schulz(m) for m in matrices]).view_as(u)
        m, n = w.shape[-2:]
        return w - self.lr * self.wd * w - self.lr * 0.2 * math.sqrt(max(m, n)) * o


def random_grads(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("num_experts", [0, 4], ids=["dense", "moe"])
def test_muon_update_matches_the_papers_formulas(num_experts, nesterov):
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_experts=num_experts))
    cfg = OptimConfig(name="muon", lr=2e-2, weight_decay=0.1, muon_nesterov=nesterov)
    optimizer = make_optimizer(model, cfg, CPU)
    optimizer.ns_dtype = torch.float32
    adamw_only = Transformer(tiny_config(num_experts=num_experts))
    adamw_only.load_state_dict(model.state_dict())
    adamw = make_optimizer(adamw_only, OptimConfig(name="adamw", lr=2e-2, weight_decay=0.1), CPU)
    plain = PlainMuon(cfg.lr, cfg.weight_decay, cfg.muon_momentum, nesterov)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        for m in (model, adamw_only):
            random_grads(m, step)
        for name, p in model.named_parameters():
            if "_proj" in name:  # attention and FFN projections, dense or stacked experts
                expected[name] = plain.step(name, expected[name], p.grad)
        optimizer.step()
        adamw.step()
    params, adamw_params = dict(model.named_parameters()), dict(adamw_only.named_parameters())
    for name, value in expected.items():
        if "proj" in name:
            torch.testing.assert_close(params[name].detach(), value, rtol=1e-5, atol=1e-6, msg=name)
    for name in ("tok_embeddings.weight", "lm_head.weight", "norm.weight", "layers.0.attn_norm.weight"):
        assert torch.equal(params[name], adamw_params[name]), f"{name} is not AdamW's"
    if num_experts:
        assert torch.equal(params["layers.0.ffn.router.weight"], adamw_params["layers.0.ffn.router.weight"])


def test_muon_matches_torch_muon_on_plain_matrices():
    """torch.optim.Muon with Moonlight's scale: same iteration (bf16), momentum, Nesterov and weight decay."""
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    names = ["layers.0.attn.q_proj.weight", "layers.0.ffn.down_proj.weight", "layers.1.attn.v_proj.weight"]
    ours = make_optimizer(model, OptimConfig(name="muon", lr=2e-2, weight_decay=0.1), CPU)
    params = dict(model.named_parameters())
    twins = [params[n].detach().clone().requires_grad_() for n in names]
    theirs = torch.optim.Muon(twins, lr=2e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = [t.detach().clone() for t in twins]
    for step in range(3):
        random_grads(model, step)
        for twin, name in zip(twins, names):
            twin.grad = params[name].grad.clone()
        ours.step()
        theirs.step()
    for name, twin, before in zip(names, twins, start):  # the same steps, up to bf16 rounding (3% apart in fp32)
        theirs_moved, ours_moved = twin.detach() - before, params[name].detach() - before
        assert ours_moved.norm() / theirs_moved.norm() == pytest.approx(1, abs=0.01), name
        assert (ours_moved - theirs_moved).norm() < 0.06 * theirs_moved.norm(), name


def test_newton_schulz_orthogonalises_each_matrix_of_a_stack():
    g = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g, 5, torch.float32)
    for i in range(3):
        torch.testing.assert_close(o[i], plain_newton_schulz(g[i]), rtol=1e-4, atol=1e-5)
    singular = torch.linalg.svdvals(o)
    assert singular.min() > 0.6 and singular.max() < 1.25  # Jordan's quintic: U S' V^T with S' near 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cosine = (o * polar).sum(dim=(-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cosine.min() > 0.98  # the direction of U V^T


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("num_experts", [0, 4], ids=["dense", "moe"])
def test_muon_takes_hidden_matrices_adamw_the_rest(num_experts, tied):
    model = Transformer(tiny_config(num_experts=num_experts, tie_embeddings=tied))
    optimizer = make_optimizer(model, OptimConfig(name="muon"), CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["use_muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.param_groups if not g["use_muon"] for p in g["params"]}
    per_layer = {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight"}
    per_layer |= {"ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"} if num_experts else {
        "ffn.gate_proj.weight", "ffn.up_proj.weight", "ffn.down_proj.weight"}  # fmt: skip
    assert muon == {f"layers.{i}.{n}" for i in range(2) for n in per_layer}
    assert muon | adamw == set(names.values()) and not muon & adamw
    assert ("layers.0.ffn.router.weight" in adamw) == bool(num_experts)


def test_set_lr_scales_muon_by_its_own_peak():
    model = Transformer(tiny_config())
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=5e-3)
    optimizer = make_optimizer(model, cfg, CPU)
    assert set_lr(optimizer, 5e-4, cfg) == 5e-4
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [5e-4, 2.5e-3]


def test_muon_reshards_state_and_matches_one_process_under_fsdp2(tmp_path):
    """4 gloo processes: uneven row shards, experts sharded on dim 1, and a 2 x 2 hybrid mesh (optim_worker.py)."""
    args = ["-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={free_port()}"]
    run_module([*args, "tests/optim_worker.py"], timeout=300)


def test_cosine_schedule():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert [lr_at(s, cfg, 110) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(10, cfg, 110) == 1.0
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_schedule(shape):
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2, decay_shape=shape)
    assert wsd_decay_steps(cfg, 100) == 20
    assert [lr_at(s, cfg, 100) for s in (0, 9, 10, 50, 79)] == [0.1, 1.0, 1.0, 1.0, 1.0]
    remaining = {"linear": lambda p: 1 - p, "1-sqrt": lambda p: 1 - math.sqrt(p)}[shape]
    for step in (80, 89, 95):
        assert lr_at(step, cfg, 100) == pytest.approx(0.1 + 0.9 * remaining((step - 79) / 20))
    assert lr_at(99, cfg, 100) == pytest.approx(0.1)  # the last update at min_lr
    exact = OptimConfig(**{**cfg.__dict__, "decay_steps": 7})
    assert lr_at(92, exact, 100) == 1.0 and lr_at(93, exact, 100) < 1.0 and lr_at(99, exact, 100) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "flag, named",
    [
        ("--optim.name=sgdd", "optim.name"),
        ("--optim.schedule=step", "optim.schedule"),
        ("--optim.decay_shape=cubic", "optim.decay_shape"),
        ("--optim.decay_fraction=0", "optim.decay_fraction"),
        ("--optim.decay_fraction=1.5", "optim.decay_fraction"),
        ("--optim.decay_steps=0", "optim.decay_steps"),
        ("--optim.muon_momentum=1", "optim.muon_momentum"),
    ],
)
def test_bad_optimizer_values_name_the_key(flag, named):
    with pytest.raises((ArgumentError, ValueError), match=named.replace(".", r"\.")):
        parse_config([flag])
