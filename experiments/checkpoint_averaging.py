"""Checkpoint averaging: the weight average of a run's last k checkpoints against its last checkpoint, on held-out
loss, with the learning rate decayed (cosine to lr/10) and kept constant.

    python -m experiments.checkpoint_averaging [--quick] [--domain email]

One model shape is trained twice on the general data of the other experiments (the stdlib without the domain
package), once per schedule, saving every `save_every` steps and keeping the last checkpoints. Reported: loss on the
general data's validation split of the last checkpoint and of the average (tools.average) of the last k, for
k = 2, 4, 8. Sanyal et al. (2023) find that averaging recent checkpoints recovers much of what decaying the rate
brings; the constant-rate run shows how much it does here. Writes table.md, results.json and plot.png to
runs/experiments/checkpoint-averaging[-quick]/.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.common import (
    PRETRAIN_LR,
    Shape,
    general_data,
    held_out_loss,
    log,
    output_dir,
    parse_args,
    pyplot,
    report,
    save_figure,
    scorer,
    stdlib_datasets,
    train,
)
from formats.average import average_checkpoints
from formats.checkpoint import complete_checkpoints


@dataclass(frozen=True)
class Budget:
    shape: Shape
    steps: int
    save_every: int
    counts: tuple[int, ...]  # numbers of last checkpoints averaged (1: the last alone)
    max_windows: int  # validation windows scored


FULL = Budget(Shape(4, 192, 6, 2, 512), steps=1000, save_every=25, counts=(1, 2, 4, 8), max_windows=400)
QUICK = Budget(Shape(2, 64, 4, 2, 176), steps=40, save_every=5, counts=(1, 2, 4), max_windows=60)
SCHEDULES = {"cosine to lr/10": PRETRAIN_LR / 10, "constant": PRETRAIN_LR}  # name: min_lr


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    budget = QUICK if args.quick else FULL
    out = output_dir("checkpoint-averaging", args.quick)
    general, _ = stdlib_datasets(args.domain, args.quick)
    curves = {}
    for i, (schedule, min_lr) in enumerate(SCHEDULES.items()):
        run = out / f"run-{i}"
        train(run, general, budget.shape, budget.steps, PRETRAIN_LR, min_lr=min_lr, save_every=budget.save_every,
              keep_last=max(budget.counts))  # fmt: skip
        log(f"{schedule}: averaging and scoring the last checkpoints")
        curves[schedule] = averaged_losses(run, general, budget)
    rows = [
        {
            "schedule": schedule,
            "checkpoints averaged": k,
            "steps": f"{budget.steps - (k - 1) * budget.save_every}-{budget.steps}" if k > 1 else str(budget.steps),
            "loss": loss,
            "vs last": loss - losses[1],
        }
        for schedule, losses in curves.items()
        for k, loss in losses.items()
    ]
    plot(out, curves)
    notes = (
        f"Held-out loss (nats/token) on {budget.max_windows} validation windows of the general data "
        f"({general_data(args.domain, args.quick)}). Each run: {budget.steps} steps at peak lr {PRETRAIN_LR:g} "
        f"with 10% warm-up, a checkpoint every {budget.save_every} steps; k = 1 is the last checkpoint alone."
    )
    extra = {"budget": asdict(budget), "losses": {s: {str(k): v for k, v in c.items()} for s, c in curves.items()}}
    report(out, "Averaging the last k checkpoints of a run", rows, notes, extra)


def averaged_losses(run: Path, data: Path, budget: Budget) -> dict[int, float]:
    """{k: held-out loss of the weight average of the run's last k checkpoints} (k = 1: the last one itself)."""
    last = complete_checkpoints(run / "checkpoints")
    losses = {}
    for k in budget.counts:
        model = last[-1]
        if k > 1:
            model = run.parent / f"{run.name}-last-{k}"
            average_checkpoints(last[-k:], model)
        losses[k] = held_out_loss(scorer(model), data, budget.max_windows)
    return losses


def plot(out, curves: dict[str, dict[int, float]]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for schedule, losses in curves.items():
        ax.plot(list(losses), list(losses.values()), marker="o", label=schedule)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(next(iter(curves.values()))), labels=[str(k) for k in next(iter(curves.values()))])
    ax.set_xlabel("last k checkpoints averaged (1: the last checkpoint)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Checkpoint averaging")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out / "plot.png")


if __name__ == "__main__":
    main()
