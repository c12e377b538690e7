"""Mixture of experts against dense (the Mixtral paper's claim at small scale): the default model (configs/tiny.yaml)
against configs/tiny-moe.yaml with experts of half the dense FFN width, so that a token passes through as many
parameters in both (top-2 of 8 experts of width 344 = one FFN of width 688), at equal steps on the default corpus,
both with AdamW + cosine (OPTIM).

    python -m experiments.moe_vs_dense [--quick] [--steps 300]

Reported: parameters (total and active per token), final validation loss, median training tokens/s. Writes
table.md, results.json and plot.png (validation loss over steps) to runs/experiments/moe-vs-dense-STEPS[-quick]/.
"""

from __future__ import annotations

import statistics

from experiments.common import ADAMW_COSINE, log, output_dir, parse_args, pyplot, report, save_figure, train_py
from model.llama import count_parameters
from training.config import parse_config

OPTIM = [*ADAMW_COSINE, "--optim.lr=2e-3", "--optim.min_lr=2e-4"]  # both runs: tiny-moe.yaml's optimizer
RUNS = {
    "dense (tiny.yaml)": ["--config=configs/tiny.yaml"],
    "MoE 8 experts, top-2 (tiny-moe.yaml, ffn_dim 344)": ["--config=configs/tiny-moe.yaml", "--model.ffn_dim=344"],
}


def run(name: str, flags: list[str], steps: int, out) -> list[dict]:
    """train.py with the config's own settings but `steps` steps; returns its metrics.jsonl records."""
    run_dir = out / ("moe" if "MoE" in name else "dense")
    args = [
        *flags,
        *OPTIM,
        f"--max_steps={steps}",
        f"--eval_every={steps // 3}",
        "--resume=none",
        "--sample_prompt=",
        f"--optim.warmup_steps={max(1, steps // 10)}",
        "--save_every=0",
    ]
    log(f"train.py {' '.join(args)}")
    return train_py(args, run_dir)


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], steps=300)
    steps = 30 if args.quick else args.steps
    out = output_dir(f"moe-vs-dense-{steps}", args.quick)
    rows, curves = [], {}
    for name, flags in RUNS.items():
        records = run(name, flags, steps, out)
        total, active = count_parameters(parse_config(flags).model)
        vals = [r for r in records if "val_loss" in r]
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        curves[name] = ([r["step"] for r in vals], [r["val_loss"] for r in vals])
        rows.append(
            {
                "model": name,
                "params": total,
                "active params": active,
                "val loss": vals[-1]["val_loss"],
                "tokens/s": round(statistics.median(speeds)),
            }
        )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.legend()
    save_figure(fig, out / "plot.png")
    report(
        out,
        f"Dense vs mixture of experts, {steps} steps on the stdlib corpus",
        rows,
        "Same data order, batch, schedule and active parameters per token; bf16-true on 2 CPU threads.",
    )


if __name__ == "__main__":
    main()
