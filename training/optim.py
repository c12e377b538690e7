"""The optimizer and its learning-rate schedule: AdamW, or Muon for the hidden matrices with AdamW for the rest;
cosine or warmup-stable-decay (WSD), counted in optimizer steps.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") keeps a momentum of each
matrix's gradient and steps along its orthogonal factor: for momentum M = U S V^T it applies U V^T, computed by five
Newton-Schulz iterations (Keller Jordan's quintic), so every direction of the matrix moves by the same amount. The
update is scaled by 0.2 sqrt(max(m, n)) (Moonlight, Liu et al. 2025, "Muon is Scalable for LLM Training"): that
gives it the RMS of a typical AdamW update, so AdamW's learning rate and weight decay carry over (`optim.muon_lr`
defaults to `optim.lr`, and the decay is AdamW's decoupled one). Matrices only: attention q/k/v/o, the FFN's
gate/up/down and every MoE expert's matrices, each expert's slice of the stacked [E, F, D] weights orthogonalised
on its own. Embeddings, output head, norm gains and the MoE router stay on AdamW.

torch has `torch.optim.Muon` since 2.9 (pytorch#160213, so in 2.11 and 2.13), with this iteration, momentum
and Moonlight's scale (`adjust_lr_fn="match_rms_adamw"`), but it takes 2-D parameters only (not the stacked expert
weights) and knows nothing of FSDP2: a parameter sharded by rows would be orthogonalised through DTensor's operator
rules (a redistribution per matmul). So this module has its own step; the tests check it against a plain
implementation of the paper's formulas and against torch.optim.Muon on plain matrices.

Under FSDP2 each matrix is sharded by rows (dim 0; stacked experts on dim 1 when there are more shards than
experts), and Newton-Schulz needs the whole matrix. Each rank is given whole matrices in turn (as nanochat's
DistMuon and Dion do) rather than gathering every matrix on every rank: one all-to-all sends every row shard of a
matrix to the rank that owns it, each rank orthogonalises the matrices it owns, one all-to-all sends the rows
back. Gathering everywhere would repeat all of the Newton-Schulz work on every rank: at the 1.1B shapes that work
is 0.32% of a step's model FLOPs when shared out, but 2.5% on 8 ranks and 10% on 32 when every rank does all of it
(docs/performance.md), and every rank would receive every matrix instead of 1/ranks of them. Owners are assigned
by Newton-Schulz cost (largest first, to the least loaded rank). Stacked experts sharded on their expert dim are
whole on their rank and are orthogonalised there. With hybrid sharding (`fsdp_replicas`) the exchange runs within
each shard group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from training.config import OptimConfig, wsd_decay_steps

# The matrices Muon updates, by their module name: attention and FFN projections, dense or stacked experts.
HIDDEN_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steep at 0, so small singular values grow fast
NS_EPS = 1e-7
MOONLIGHT_SCALE = 0.2  # update RMS of AdamW's typical 0.2-0.4


def is_hidden_matrix(name: str) -> bool:
    """Whether parameter `name` (as model.named_parameters() gives it, wrapped or not) is updated by Muon."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1] in HIDDEN_MATRICES


def adamw_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay, norm gains do not."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """`optim.name` adamw: AdamW on everything; muon: Muon on the hidden matrices, AdamW on the rest. AdamW runs
    fused on CUDA and CPU."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adamw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": device.type in ("cuda", "cpu")}
    if cfg.name == "adamw":
        return torch.optim.AdamW(adamw_groups([p for _, p in named], cfg.weight_decay), **adamw)
    return MuonWithAdamW(
        [p for n, p in named if is_hidden_matrix(n)],
        adamw_groups([p for n, p in named if not is_hidden_matrix(n)], cfg.weight_decay),
        lr=muon_lr(cfg),
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
        adamw=adamw,
    )


def muon_lr(cfg: OptimConfig) -> float:
    return cfg.lr if cfg.muon_lr is None else cfg.muon_lr


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The AdamW learning rate of optimizer step `step` (0-based): linear warm-up over `warmup_steps`, then either
    cosine decay to `min_lr` at `max_steps`, or (wsd) `lr` until the last wsd_decay_steps() steps, which decay to
    `min_lr` (the last one at `min_lr`) along `decay_shape`: linear, or 1-sqrt (lr falls as 1 - sqrt(progress))."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    decay = wsd_decay_steps(cfg, max_steps)
    progress = min(1.0, max(0, step - (max_steps - decay) + 1) / decay)
    remaining = 1 - progress if cfg.decay_shape == "linear" else 1 - math.sqrt(progress)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * remaining


def set_lr(optimizer: torch.optim.Optimizer, lr: float, cfg: OptimConfig) -> float:
    """AdamW's groups get `lr`, Muon's `lr` x muon_lr / lr (the same schedule, from the configuration in force)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * muon_lr(cfg) / cfg.lr if group.get("use_muon") else lr
    return lr


def newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The orthogonal factor U V^T of each matrix G = U S V^T in `g` [..., m, n], approximately (singular values
    come out between about 0.7 and 1.2): X = G / |G|_F, then `steps` times X <- aX + (bA + cA²)X with A = XX^T,
    on the wide orientation (so A is the smaller Gram matrix). In bf16 by default, as Keller Jordan runs it."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) tensor; in-place changes to it change the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def chunk_sizes(n: int, ranks: int) -> list[int]:
    """Rows of each rank when n rows are split as torch.chunk splits them (DTensor's Shard and FSDP2 do)."""
    size = -(-n // ranks)
    return [max(0, min(size, n - r * size)) for r in range(ranks)]


class Split:
    """A parameter whose matrices are split across the ranks of one mesh dimension: along dim `dim`, which is one
    of its two matrix dims."""

    def __init__(self, p: DTensor, mesh_dim: int, dim: int) -> None:
        mesh = p.device_mesh
        self.group, self.rank, self.ranks = mesh.get_group(mesh_dim), mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim)
        self.shape, self.dim = tuple(p.shape), dim
        self.sizes = chunk_sizes(self.shape[dim], self.ranks)
        if tuple(p.to_local().shape) != self.piece_shape(self.rank):  # the exchange relies on torch.chunk's rule
            raise RuntimeError(f"Muon: a {self.shape} shard is {tuple(p.to_local().shape)}, not torch.chunk's split")

    def piece_shape(self, rank: int) -> tuple[int, ...]:
        return tuple(self.sizes[rank] if d == self.dim else s for d, s in enumerate(self.shape))

    def piece(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        return full.narrow(self.dim, sum(self.sizes[:rank]), self.sizes[rank])

    def cost(self) -> int:
        m, n = self.shape[-2:]
        return math.prod(self.shape) * min(m, n)


def split_of(p: torch.Tensor) -> Split | None:
    """How `p`'s matrices are split across ranks, or None when this rank holds whole matrices (a plain tensor, a
    one-rank mesh, or stacked experts sharded on their expert dim)."""
    if not isinstance(p, DTensor):
        return None
    shards = [(mesh_dim, pl.dim) for mesh_dim, pl in enumerate(p.placements) if pl.is_shard()]
    if len(shards) > 1:
        raise ValueError(f"Muon: a parameter sharded over {len(shards)} mesh dimensions is not supported")
    if not shards or p.device_mesh.size(shards[0][0]) == 1 or shards[0][1] < p.ndim - 2:
        return None
    return Split(p, *shards[0])


def assign_owners(splits: list[Split], ranks: int) -> list[int]:
    """A rank for each matrix, the costliest first to the least loaded rank (the same answer on every rank)."""
    load, owners = [0] * ranks, [0] * len(splits)
    for i in sorted(range(len(splits)), key=lambda i: -splits[i].cost()):
        owners[i] = min(range(ranks), key=lambda r: load[r])
        load[owners[i]] += splits[i].cost()
    return owners


def orthogonalize_split(
    splits: list[Split], updates: list[torch.Tensor], steps: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Newton-Schulz of matrices split across the ranks of one process group, each done once, by its owner: one
    all-to-all brings the owner every rank's piece, one takes the orthogonalised pieces back. Returns this rank's
    pieces."""
    group, rank, ranks = splits[0].group, splits[0].rank, splits[0].ranks
    owners = assign_owners(splits, ranks)
    mine = [i for i, owner in enumerate(owners) if owner == rank]
    by_owner = [[i for i, owner in enumerate(owners) if owner == r] for r in range(ranks)]
    sent = [sum(updates[i].numel() for i in by_owner[r]) for r in range(ranks)]
    received = [sum(math.prod(splits[i].piece_shape(r)) for i in mine) for r in range(ranks)]

    pieces = torch.cat([updates[i].to(dtype).flatten() for r in range(ranks) for i in by_owner[r]])
    gathered = pieces.new_empty(sum(received))
    dist.all_to_all_single(gathered, pieces, received, sent, group=group)
    parts = iter(gathered.split([math.prod(splits[i].piece_shape(r)) for r in range(ranks) for i in mine]))
    rows = {i: [None] * ranks for i in mine}
    for r in range(ranks):
        for i in mine:
            rows[i][r] = next(parts).view(splits[i].piece_shape(r))
    ortho = {i: newton_schulz(torch.cat(rows[i], dim=splits[i].dim), steps, dtype) for i in mine}

    back = torch.cat([splits[i].piece(ortho[i], r).flatten() for r in range(ranks) for i in mine]) if mine else None
    returned = pieces.new_empty(sum(sent))
    dist.all_to_all_single(returned, pieces.new_empty(0) if back is None else back, sent, received, group=group)
    parts = iter(returned.split([updates[i].numel() for r in range(ranks) for i in by_owner[r]]))
    out: list[torch.Tensor | None] = [None] * len(updates)
    for r in range(ranks):
        for i in by_owner[r]:
            out[i] = next(parts).view_as(updates[i])
    return out


def orthogonalize(
    params: list[torch.Tensor], updates: list[torch.Tensor], steps: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Newton-Schulz of each parameter's update (`updates`: this rank's parts), whole matrices at a time."""
    out: list[torch.Tensor | None] = [None] * len(updates)
    by_group: dict[object, list[tuple[int, Split]]] = {}
    for i, p in enumerate(params):
        split = split_of(p)
        if split is None:
            out[i] = newton_schulz(updates[i], steps, dtype)
        else:
            by_group.setdefault(split.group, []).append((i, split))
    for members in by_group.values():
        index, splits = zip(*members)
        for i, ortho in zip(index, orthogonalize_split(list(splits), [updates[i] for i in index], steps, dtype)):
            out[i] = ortho
    return out


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer: Muon for the group of hidden matrices, torch's own AdamW for the other groups.

    One object, so that train_step, the schedule (set_lr) and the checkpoint (torch.distributed.checkpoint's
    get/set_optimizer_state_dict) treat it as they treat AdamW. The AdamW groups and their state are shared with an
    inner torch.optim.AdamW, which steps them; Muon's state is one `momentum_buffer` per matrix, sharded as the
    matrix is, so it saves, loads and reshards like AdamW's moments."""

    def __init__(
        self,
        matrices: list[torch.nn.Parameter],
        other_groups: list[dict],
        *,
        lr: float,
        weight_decay: float,
        momentum: float,
        nesterov: bool,
        ns_steps: int,
        adamw: dict,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        muon = {"params": matrices, "lr": lr, "weight_decay": weight_decay, "momentum": momentum}
        muon |= {"nesterov": nesterov, "ns_steps": ns_steps, "use_muon": True}
        self.ns_dtype = ns_dtype
        self.adamw = torch.optim.AdamW([{**g, "use_muon": False} for g in other_groups], **adamw)
        super().__init__([muon, *self.adamw.param_groups], defaults={})
        self._share_with_adamw()

    def _share_with_adamw(self) -> None:
        self.adamw.param_groups = [g for g in self.param_groups if not g["use_muon"]]
        self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        self._share_with_adamw()

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
        self.adamw.step()

    def _muon_step(self, group: dict) -> None:
        """Momentum (an exponential average, with Nesterov's look-ahead), orthogonalised, scaled by
        0.2 sqrt(max(m, n)); decoupled weight decay. Elementwise work on this rank's shards."""
        params = [p for p in group["params"] if p.grad is not None]
        updates, beta = [], group["momentum"]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buf, grad = local(self.state[p]["momentum_buffer"]), local(p.grad)
            buf.lerp_(grad, 1 - beta)
            updates.append(grad.lerp(buf, beta) if group["nesterov"] else buf)
        for p, ortho in zip(params, orthogonalize(params, updates, group["ns_steps"], self.ns_dtype)):
            weight = local(p)
            weight.mul_(1 - group["lr"] * group["weight_decay"])
            weight.add_(ortho, alpha=-group["lr"] * MOONLIGHT_SCALE * math.sqrt(max(p.shape[-2:])))
