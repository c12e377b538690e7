"""Less compute for the same loss: TinyLlama's recipe (AdamW with betas 0.9/0.95, cosine decay to lr/10) against
Muon with a warmup-stable-decay (WSD) schedule, at the same token budget, on configs/tiny.yaml's model, batch and
data (the stdlib corpus), with the same data order and seed.

    python -m experiments.recipe [--quick]

No recipe wins by a better-tuned learning rate: each one's is the best (lowest final validation loss) of the same
sweep: LRS, extended by a factor of 2 beyond its edge while the best lies there (at most MAX_EXTENSIONS times). The
baseline's sweep sets AdamW's lr; Muon's sets Muon's lr (the hidden matrices), while its AdamW part (embedding, head,
norm gains) keeps the baseline's best lr. Both warm up over the first 10% of the steps and decay to a tenth of their
peak; WSD holds the peak, then decays linearly over the last DECAY_FRACTION of the steps.

Then the token fraction: the best Muon run saved its stable phase's checkpoints, and decay branches (train.py
--branch_from) finish them at smaller budgets by the full run's own rule: a budget of B steps decays over its last
DECAY_FRACTION x B steps, so it branches from the checkpoint of step (1 - DECAY_FRACTION) x B. The smallest budget
whose decayed validation loss reaches the baseline's final one (linear interpolation between the end-points) is
reported as a fraction of the baseline's tokens. Writes table.md, results.json and recipe.png to
runs/experiments/recipe[-quick]/.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments.common import ADAMW_COSINE, Shape, log, output_dir, parse_args, pyplot, report, save_figure, train_py
from formats.checkpoint import checkpoint_name
from training.config import parse_config

CONFIG = "configs/tiny.yaml"
LRS = (1e-3, 2e-3, 4e-3)  # a factor of 2 apart
MAX_EXTENSIONS = 2
DECAY_FRACTION = 0.2
BASELINE, MUON = "AdamW + cosine", "Muon + WSD"


@dataclass(frozen=True)
class Budget:
    steps: int
    branch_at: tuple[int, ...]  # stable-phase steps of the best Muon run that decay branches start from
    eval_every: int
    shape: Shape | None = None  # None: the config's model

    @property
    def save_every(self) -> int:
        """The Muon runs' checkpoint interval: every branch point is a multiple of it."""
        return math.gcd(*self.branch_at)


FULL = Budget(steps=280, branch_at=(84, 112, 140, 168, 196), eval_every=40)
QUICK = Budget(steps=40, branch_at=(12, 20, 28), eval_every=10, shape=Shape(2, 64, 4, 2, 176))


@dataclass(eq=False)  # runs are compared by identity
class Run:
    recipe: str
    lr: float  # the swept one: AdamW's for the baseline, Muon's for Muon
    dir: Path
    evals: list[dict] = field(default_factory=list)  # metrics.jsonl's evaluation records, by step

    @property
    def final(self) -> dict:
        return self.evals[-1]


def optim_flags(recipe: str, lr: float, adamw_lr: float, budget: Budget) -> list[str]:
    """The recipe's optimizer and schedule, every key set (whatever the config's defaults)."""
    shared = [
        "--optim.beta1=0.9", "--optim.beta2=0.95", "--optim.weight_decay=0.1", "--optim.grad_clip=1.0",
        f"--optim.warmup_steps={budget.steps // 10}", f"--optim.lr={adamw_lr}", f"--optim.min_lr={adamw_lr / 10}",
    ]  # fmt: skip
    if recipe == BASELINE:
        return [*shared, *ADAMW_COSINE]
    return [
        *shared, "--optim.name=muon", f"--optim.muon_lr={lr}", "--optim.schedule=wsd",
        f"--optim.decay_fraction={DECAY_FRACTION}", "--optim.decay_shape=linear",
    ]  # fmt: skip


def train_run(out: Path, recipe: str, lr: float, adamw_lr: float, budget: Budget) -> Run:
    """One full-budget run; Muon's keep every checkpoint a branch may start from."""
    run = Run(recipe, lr, out / f"{'adamw' if recipe == BASELINE else 'muon'}-lr{lr:g}")
    save_every = budget.save_every if recipe == MUON else 0  # 0: the final checkpoint only
    args = [
        f"--config={CONFIG}", *(budget.shape.flags() if budget.shape else []), f"--max_steps={budget.steps}",
        f"--eval_every={budget.eval_every}", f"--save_every={save_every}", "--keep_last=0", "--resume=none",
        "--sample_prompt=", *optim_flags(recipe, lr, adamw_lr, budget),
    ]  # fmt: skip
    log(f"{recipe}, lr {lr:g}: {budget.steps} steps -> {run.dir.name}")
    run.evals = evaluations(train_py(args, run.dir))
    log(f"{recipe}, lr {lr:g}: val loss {run.final['val_loss']:.4f}")
    return run


def evaluations(records: list[dict]) -> list[dict]:
    return [r for r in records if "val_loss" in r]


def sweep(out: Path, recipe: str, budget: Budget, adamw_lr: float | None = None) -> list[Run]:
    """The recipe at every lr of LRS, then at the next lr beyond the sweep's edge (half the smallest or twice the
    largest) while the best run is at that edge, at most MAX_EXTENSIONS times; sorted by lr. The baseline's AdamW
    lr is the swept one itself."""

    def run(lr: float) -> Run:
        return train_run(out, recipe, lr, lr if adamw_lr is None else adamw_lr, budget)

    runs = [run(lr) for lr in LRS]
    for _ in range(MAX_EXTENSIONS):
        runs.sort(key=lambda r: r.lr)
        if best(runs) is runs[0]:
            runs.append(run(runs[0].lr / 2))
        elif best(runs) is runs[-1]:
            runs.append(run(runs[-1].lr * 2))
        else:
            break
    return sorted(runs, key=lambda r: r.lr)


def at_edge(runs: list[Run]) -> bool:
    """Whether the best of a sweep (sorted by lr) is its smallest or largest lr: the optimum may lie beyond."""
    return best(runs) in (runs[0], runs[-1])


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda run: run.final["val_loss"])


def branch_decay_steps(step: int) -> int:
    """Decay steps of the branch from `step`: DECAY_FRACTION of its budget, so that the stable part is the rest."""
    return round(step * DECAY_FRACTION / (1 - DECAY_FRACTION))


def decay_branch(out: Path, origin: Run, step: int) -> dict:
    """The decayed end-point of `origin` branched at `step`: {step, decay_steps, val_loss, val_bpb, ...}."""
    decay = branch_decay_steps(step)
    checkpoint = origin.dir / "checkpoints" / checkpoint_name(step)
    log(f"decay branch from step {step}: {decay} steps")
    args = [f"--branch_from={checkpoint}", f"--optim.decay_steps={decay}", "--save_every=0"]
    end = evaluations(train_py(args, out / f"branch-{step}"))[-1]
    log(f"decay branch from step {step}: val loss {end['val_loss']:.4f} at step {end['step']}")
    return {"branch_from": step, "decay_steps": decay, **end}


def budget_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The smallest budget whose loss reaches `target`, from (budget, loss) end-points: linear interpolation between
    the first point at or below it and the one before; the smallest budget itself if that already reaches it (a bound
    from above); None if no point does."""
    points = sorted(points)
    for i, (budget, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return budget
            (b0, l0), (b1, l1) = points[i - 1], points[i]
            return b0 + (b1 - b0) * (l0 - target) / (l0 - l1)
    return None


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    budget = QUICK if args.quick else FULL
    out = output_dir("recipe", args.quick)
    started = time.perf_counter()
    cfg = parse_config([f"--config={CONFIG}"])
    tokens_per_step = cfg.global_batch_size * cfg.seq_len

    baselines = sweep(out, BASELINE, budget)
    baseline = best(baselines)
    muons = sweep(out, MUON, budget, adamw_lr=baseline.lr)
    muon = best(muons)
    branches = [decay_branch(out, muon, step) for step in budget.branch_at]

    target = baseline.final["val_loss"]
    points = sorted([(b["step"], b["val_loss"]) for b in branches] + [(budget.steps, muon.final["val_loss"])])
    steps_needed = budget_to_reach(points, target)
    fraction = None if steps_needed is None else steps_needed / budget.steps
    at_most = steps_needed == points[0][0]  # reached by the smallest budget tried: the fraction is a bound
    minutes = (time.perf_counter() - started) / 60
    log(f"finished in {minutes:.1f} min; token fraction {fraction}")

    plot(out / "recipe.png", baseline, muon, branches, steps_needed, tokens_per_step)
    rows = table_rows([*baselines, *muons], baseline, muon, branches, target, tokens_per_step)
    notes = describe(baselines, muons, budget, steps_needed, at_most, tokens_per_step, minutes)
    extra = {
        "lrs": LRS,
        "sweep": {runs[0].recipe: {f"{r.lr:g}": r.final["val_loss"] for r in runs} for runs in (baselines, muons)},
        "best_lr": {BASELINE: baseline.lr, MUON: muon.lr},
        "muon_adamw_lr": baseline.lr,
        "baseline_val_loss": target,
        "branches": branches,
        "steps": budget.steps,
        "tokens_per_step": tokens_per_step,
        "steps_to_reach_baseline": steps_needed,
        "token_fraction": fraction,
        "curves": {r.recipe: r.evals for r in (baseline, muon)},
        "minutes": round(minutes, 1),
    }
    report(out, f"{BASELINE} (TinyLlama) vs {MUON}, same tokens", rows, notes, extra)


def table_rows(
    runs: list[Run], baseline: Run, muon: Run, branches: list[dict], target: float, tokens_per_step: int
) -> list[dict]:
    def row(recipe: str, lr: str, what: str, end: dict) -> dict:
        return {
            "recipe": recipe,
            "lr": lr,
            "run": what,
            "steps": end["step"],
            "tokens": end["step"] * tokens_per_step,
            "val loss": end["val_loss"],
            "val bpb": end["val_bpb"],
            "vs baseline": end["val_loss"] - target,
        }

    rows = [row(r.recipe, f"{r.lr:g}", "sweep, best" if r is baseline or r is muon else "sweep", r.final) for r in runs]
    rows += [
        row(MUON, f"{muon.lr:g}", f"decay branch of step {b['branch_from']} ({b['decay_steps']} steps)", b)
        for b in branches
    ]
    return rows


def describe(
    baselines: list[Run],
    muons: list[Run],
    budget: Budget,
    steps_needed: float | None,
    at_most: bool,
    tokens_per_step: int,
    minutes: float,
) -> str:
    """table.md's notes: the setting, the lr sweeps, the branch rule and the token fraction."""
    shape = budget.shape
    model = f"`{CONFIG}`'s model" if shape is None else f"a {shape.n_layers} x {shape.dim} model (ffn {shape.ffn_dim})"
    setting = (
        f"Validation loss (nats/token) and bits per byte on the stdlib corpus' validation split; {model} and batch, "
        f"{budget.steps} steps of {tokens_per_step:,} tokens, seed 1337 and the same data order in every run, "
        f"warm-up {budget.steps // 10} steps."
    )
    sweeps = (
        f"lr: AdamW's for the baseline; Muon's for {MUON}, whose AdamW part keeps the baseline's best lr "
        f"({best(baselines).lr:g}). Each sweep is {', '.join(f'{lr:g}' for lr in LRS)}, extended by a factor of 2 "
        f"beyond its edge while the best lies there (at most {MAX_EXTENSIONS} times)."
    )
    sweeps += "".join(
        f" {r[0].recipe}'s best lr is at the edge of its sweep." for r in (baselines, muons) if at_edge(r)
    )
    branches = (
        f"Decay branches: a budget of B steps decays linearly over its last {DECAY_FRACTION:g} B (the full run's "
        f"rule), branched from the best Muon run's checkpoint of step {1 - DECAY_FRACTION:g} B."
    )
    if steps_needed is None:
        reached = f"{MUON} does not reach the baseline's final loss within the baseline's budget (fraction > 1)."
    else:
        bound = "at most " if at_most else ""
        reached = (
            f"{MUON} reaches the baseline's final validation loss ({best(baselines).final['val_loss']:.4f}) after "
            f"{bound}{steps_needed:.0f} steps ({steps_needed * tokens_per_step:,.0f} tokens): {bound}"
            f"**{steps_needed / budget.steps:.2f}** of the baseline's tokens."
        )
    return f"{setting} {sweeps} {branches} {reached} Run time {minutes:.1f} min."


def plot(
    path: Path, baseline: Run, muon: Run, branches: list[dict], steps_needed: float | None, tokens_per_step: int
) -> None:
    """Validation loss and bpb against tokens: each recipe's best run, the decay branches' end-points, the baseline's
    final value and the budget at which Muon + WSD reaches it."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("val_loss", "val_bpb"), ("validation loss (nats/token)", "validation bits/byte")):
        for run, color in ((baseline, "C0"), (muon, "C1")):
            shown = [e for e in run.evals if e["step"] > 0]  # step 0 (untrained) would flatten the rest
            x = [e["step"] * tokens_per_step / 1e6 for e in shown]
            ax.plot(x, [e[key] for e in shown], marker="o", ms=3, color=color, label=f"{run.recipe}, lr {run.lr:g}")
        ax.scatter([b["step"] * tokens_per_step / 1e6 for b in branches], [b[key] for b in branches], marker="*",
                   s=90, color="C3", zorder=3, label=f"{MUON}: decay branches")  # fmt: skip
        ax.axhline(baseline.final[key], ls="--", lw=0.8, color="C0", label="the baseline's final value")
        if steps_needed is not None:
            x = steps_needed * tokens_per_step / 1e6
            ax.axvline(x, ls=":", lw=0.8, color="C3", label=f"{MUON} reaches the baseline's final loss")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper right", fontsize="small")  # the empty corner of the bpb panel
    axes[0].set_title(f"{BASELINE} vs {MUON}")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
