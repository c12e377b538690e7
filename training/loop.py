"""The pieces of one training run that train.py strings together: one optimizer step, evaluation, the run's
progress counters and the stop-signal flag (the optimizer and its schedule: training/optim.py)."""

from __future__ import annotations

import base64
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from lightning.fabric import Fabric

from data.stream import DataState, TokenStream, val_batches
from data.tokenizer import TextBytes
from model.loss import IGNORE_INDEX
from training.config import TrainConfig
from training.guard import SpikeGuard
from training.setup import TrainingError

# The per-step scalars, reduced as means over ranks; all must be finite for an update.
SCALAR_TERMS = ("loss", "grad_norm", "output_z_loss", "aux_loss", "balance_loss", "z_loss")


@dataclass
class Progress:
    """Counters that a checkpoint restores, next to model and optimizer state (the spike guard's window and count
    among them)."""

    data: DataState
    guard: SpikeGuard
    step: int = 0
    tokens: int = 0

    def advance(self, tokens: int, quotas: list[int]) -> None:
        """One optimizer step done: `tokens` trained on, each dataset's quota of windows consumed."""
        self.step += 1
        self.tokens += tokens
        self.data.advance(quotas)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            **self.guard.state_dict(),
            "data": self.data.state_dict(),
            "rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.guard.load_state_dict(state)
        self.data.load_state_dict(state["data"])
        rng = torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8)
        torch.set_rng_state(rng)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: str | None  # why the update was skipped (on every rank); None: it was applied
    stop_requested: bool  # SIGTERM or SIGINT reached at least one rank
    metrics: dict = field(default_factory=dict)  # more scalars to log: output_z_loss, the MoE's losses and load


def skip_or_stop(progress: Progress, result: StepResult, max_skipped: int, fabric: Fabric) -> None:
    """The step's update was skipped; stop once more than `max_skipped` were (without saving: the newest checkpoint
    holds the state before the trouble)."""
    fabric.print(f"step {progress.step}: update skipped ({result.skipped})")
    if progress.guard.skipped > max_skipped:
        raise TrainingError(
            f"step {progress.step}: update skipped ({result.skipped}); {progress.guard.skipped} skipped in all, more "
            f"than optim.max_skipped_steps={max_skipped}: stopped without saving"
        )


class Packed:
    """Named tensors flattened into one fp32 tensor, so one collective reduces them all and one host read brings
    them back: `Packed({"loss": l, "load": load_LE}).tensor`, then `.read(tensor)` gives {"loss": float, "load":
    nested lists}."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        self.shapes = {name: tuple(v.shape) for name, v in values.items()}
        self.tensor = torch.cat([v.detach().float().reshape(-1) for v in values.values()])

    def read(self, tensor: torch.Tensor) -> dict[str, float | list]:
        flat, out, start = tensor.tolist(), {}, 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            out[name] = flat[start] if not shape else torch.tensor(flat[start : start + n]).view(shape).tolist()
            start += n
        return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes, in place, with one collective on the default group and no barrier (Fabric's
    all_reduce adds one); nothing to do in a single process without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def train_step(
    fabric: Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    accum: int,
    grad_clip: float,
    stop_flag: bool,
    sync_every_micro_batch: bool = False,
    guard: SpikeGuard | None = None,
) -> StepResult:
    """Forward and backward over `accum` micro-batches, clip, and step, unless `guard` (default: one that skips
    only non-finite steps) finds the step's loss or gradient norm spiking; then the update is skipped everywhere.
    Everything the ranks agree on (losses, flags, expert load) is reduced in one all_reduce and read back to the
    host once, so every rank's guard judges the same numbers."""
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        batch = next(batches).to(fabric.device, non_blocking=True)
        with fabric.no_backward_sync(model, enabled=micro < accum - 1 and not sync_every_micro_batch):
            out = model(batch[:, :-1], batch[:, 1:])
            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
            fabric.backward(loss / accum)
        terms = {"loss": out.loss, "output_z_loss": out.output_z_loss}
        if out.aux_loss is not None:
            terms |= {"aux_loss": out.aux_loss, "balance_loss": out.balance_loss, "z_loss": out.z_loss}
            terms["expert_load"] = out.expert_load
        for name, value in terms.items():
            value = value.detach().float()
            sums[name] = sums[name] + value if name in sums else value
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    means = {name: total / accum for name, total in sums.items()}
    packed = Packed({**means, "grad_norm": grad_norm, "stop": torch.tensor(float(stop_flag), device=fabric.device)})
    world = fabric.world_size
    reduced = packed.read(all_reduce_sum(packed.tensor))  # the step's only host sync
    scalars = {k: v / world for k, v in reduced.items() if k in SCALAR_TERMS}
    mean_loss, mean_norm = scalars.pop("loss"), scalars.pop("grad_norm")
    skipped = (guard or SpikeGuard(None, 2)).check(mean_loss, mean_norm, *scalars.values())
    if skipped is None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    result = StepResult(mean_loss, mean_norm, skipped, reduced["stop"] > 0, scalars)
    if "expert_load" in reduced:
        result.metrics["expert_load"] = [[v / world for v in layer] for layer in reduced["expert_load"]]
    return result


@torch.no_grad()
def evaluate(
    fabric: Fabric,
    model: torch.nn.Module,
    streams: list[TokenStream],
    weights: list[float],
    cfg: TrainConfig,
    text_bytes: TextBytes | None = None,
) -> dict:
    """Validation loss per token over the first `eval_windows` windows of each dataset's validation split, and
    with `text_bytes` (the datasets' tokenizer's) bits per byte of the text those windows score: its own bytes,
    not the split's average ratio applied to its tokens, so that bits and bytes are of the same text."""
    losses, bpbs = [], []
    for stream in streams:
        sums = torch.zeros(3, dtype=torch.float64, device=fabric.device)  # summed token losses, tokens, bytes
        batches = val_batches(
            stream,
            cfg.seq_len,
            cfg.model.vocab_size,
            cfg.micro_batch_size,
            fabric.global_rank,
            fabric.world_size,
            cfg.eval_windows,
        )
        for inputs, targets in batches:
            inputs, targets = inputs.to(fabric.device), targets.to(fabric.device)
            n_tokens = (targets != IGNORE_INDEX).sum()
            n_bytes = text_bytes.count(inputs, targets) if text_bytes else torch.zeros((), device=fabric.device)
            nats = model(inputs, targets).loss.double() * n_tokens
            sums += torch.stack([nats, n_tokens.double(), n_bytes.double()])
        nats, tokens, n_bytes = fabric.all_reduce(sums, reduce_op="sum").tolist()
        losses.append(nats / tokens)
        bpbs.append(nats / max(n_bytes, 1.0) / math.log(2))
    metrics = {"val_loss": weighted_mean(losses, weights)}
    metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
    if text_bytes:
        metrics["val_bpb"] = weighted_mean(bpbs, weights)
    if len(streams) > 1:
        metrics.update({f"val_loss/{s.dir.name}": loss for s, loss in zip(streams, losses)})
        metrics.update({f"val_bpb/{s.dir.name}": bpb for s, bpb in zip(streams, bpbs) if text_bytes})
    return metrics


def weighted_mean(values: list[float], weights: list[float]) -> float:
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


class StopOnSignal:
    """SIGTERM (what Slurm and preemptible clouds send) and a first Ctrl-C (SIGINT) only set a flag: the run saves
    and exits at a step end. A second Ctrl-C stops at once (KeyboardInterrupt); a save it interrupts is a temporary
    directory, which resume never picks."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None  # the name of the first signal
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
