"""What the experiment scripts share: stdlib datasets, train.py runs, held-out losses, a prediction ensemble, and
the report (markdown table, JSON, plot) each one writes into its folder under runs/experiments/."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.tables import markdown_table
from data.prepare import prepare
from data.shards import MANIFEST, TOKENIZER_FILE, read_manifest
from data.sources import stdlib_files
from data.tokenizer import Tokenizer
from formats.checkpoint import checkpoint_name, load_model
from model.llama import Transformer
from tools.perplexity import ALL_WINDOWS, dataset_batches, score
from tools.proxy import Scorer, checkpoint_tokenizer

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "experiments"
VOCAB_SIZE = 2048
SEQ_LEN = 128
BATCH = 8  # sequences per optimizer step
PRETRAIN_LR, TUNE_LR = 3e-3, 1e-3
QUICK_GENERAL = [""]  # --quick: the stdlib's top-level modules only (no packages), ~5 MB of source
NOT_GENERAL = ["test"]  # the stdlib's own tests, which hold the domain's tests (test/test_email, ...)
# The optimizer of the experiments that compare something else: TinyLlama's AdamW + cosine, which their reported
# figures were measured with (configs/tiny.yaml's default has since become Muon + WSD: experiments/recipe.py).
ADAMW_COSINE = ["--optim.name=adamw", "--optim.schedule=cosine"]

# torch.distributed.checkpoint warns on every load and save in a single process, which is all these scripts do.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


@dataclass(frozen=True)
class Shape:
    """A decoder's size, as train.py --model.* flags."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int

    def flags(self) -> list[str]:
        return [f"--model.{key}={value}" for key, value in vars(self).items()]


def parse_args(description: str, steps: int | None = None) -> argparse.Namespace:
    """--quick and --domain; --steps too when the experiment has a default number of steps."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="shrink everything to finish in a minute or two")
    p.add_argument("--domain", default="email", help="the held-out stdlib package")
    if steps is not None:
        p.add_argument("--steps", type=int, default=steps, help="optimizer steps of each run")
    return p.parse_args()


def output_dir(name: str, quick: bool) -> Path:
    """A fresh runs/experiments/NAME (NAME-quick for --quick): the script's previous output there is removed."""
    out = RUNS / (f"{name}-quick" if quick else name)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def stdlib_datasets(domain: str, quick: bool) -> tuple[Path, Path]:
    """(general, domain): the stdlib without `domain` (and without its tests), and `domain` alone, prepared with one
    shared tokenizer (the general data's). Kept under runs/experiments/data/ and reused by later runs."""
    root = RUNS / "data" / (f"{domain}-quick" if quick else domain)
    general, held_out = root / "general", root / "domain"
    if not (general / MANIFEST).is_file():
        log(f"preparing {general}")
        files = stdlib_files(packages=QUICK_GENERAL) if quick else stdlib_files(exclude=[domain, *NOT_GENERAL])
        prepare(files, general, vocab_size=VOCAB_SIZE, workers=2, val_fraction=0.02, shard_mb=4, progress=False)
    if not (held_out / MANIFEST).is_file():
        log(f"preparing {held_out}")
        files = stdlib_files(packages=[domain])
        prepare(files, held_out, tokenizer=general / TOKENIZER_FILE, val_fraction=0.1, shard_mb=4, progress=False)
    return general, held_out


def general_data(domain: str, quick: bool) -> str:
    """The general dataset in words, for the reports."""
    return "the stdlib's top-level modules" if quick else f"the stdlib without `{domain}` and the `test` package"


def train(
    out_dir: Path,
    data: Path,
    shape: Shape,
    steps: int,
    lr: float,
    seed: int = 1,
    init_from: Path | None = None,
    min_lr: float | None = None,
    save_every: int = 0,
    keep_last: int = 1,
) -> Path:
    """Run train.py as a user would (output in OUT_DIR/train.log); returns the final checkpoint.

    AdamW, warm-up over 10% of the steps, then cosine decay to `min_lr` (default lr / 10)."""
    vocab = read_manifest(data)["tokenizer"]["vocab_size"]
    args = [
        f"--data={data}", *shape.flags(), f"--model.vocab_size={vocab}", *ADAMW_COSINE,
        f"--model.max_seq_len={SEQ_LEN}", f"--seq_len={SEQ_LEN}", f"--micro_batch_size={BATCH}",
        f"--global_batch_size={BATCH}", f"--max_steps={steps}", f"--seed={seed}", f"--optim.lr={lr}",
        f"--optim.min_lr={lr / 10 if min_lr is None else min_lr}", f"--optim.warmup_steps={max(1, steps // 10)}",
        "--precision=bf16-true", "--eval_every=0", "--sample_prompt=", "--resume=none", "--log_every=10",
        f"--save_every={save_every}", f"--keep_last={keep_last}",
    ]  # fmt: skip
    if init_from is not None:
        args.append(f"--init_from={init_from}")
    log(f"train.py -> {out_dir.name}: {steps} steps{f' from {init_from.parent.parent.name}' if init_from else ''}")
    train_py(args, out_dir)
    return out_dir / "checkpoints" / checkpoint_name(steps)


def train_py(args: list[str], out_dir: Path) -> list[dict]:
    """`train.py ARGS --out_dir=OUT_DIR` as a user runs it (its output in OUT_DIR/train.log); returns the run's
    metrics.jsonl records. A failed run raises RuntimeError with the end of its output."""
    out_dir.mkdir(parents=True, exist_ok=True)
    output_file = out_dir / "train.log"
    with open(output_file, "w") as output:
        command = [sys.executable, "train.py", *args, f"--out_dir={out_dir}"]
        proc = subprocess.run(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({proc.returncode}) for {out_dir}:\n{output_file.read_text()[-2000:]}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def load(checkpoint: Path) -> Transformer:
    return load_model(checkpoint)[0]


def scorer(checkpoint: Path) -> Scorer:
    """One checkpoint's model and tokenizer, as tools.perplexity scores them."""
    return Scorer(load(checkpoint), checkpoint_tokenizer(checkpoint))


@dataclass
class Ensemble:
    """A prediction ensemble: the mean of its members' next-token probabilities, returned as log-probabilities
    (which cross-entropy takes as logits, since they are already normalised)."""

    members: list[Transformer]
    tokenizer: Tokenizer

    @property
    def device(self) -> torch.device:
        return self.members[0].lm_head.weight.device

    @property
    def max_seq_len(self) -> int:
        return min(m.cfg.max_seq_len for m in self.members)

    @torch.no_grad()
    def logits(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([m(tokens_BT).logits.float().log_softmax(dim=-1) for m in self.members])
        return log_probs.logsumexp(dim=0) - math.log(len(self.members))


def held_out_loss(model: Scorer | Ensemble, data: Path, max_windows: int = ALL_WINDOWS) -> float:
    """Mean next-token loss on the validation split of `data`, windows of the model's context, as tools.perplexity."""
    tok = model.tokenizer
    batches = dataset_batches(data, "val", tok, model.max_seq_len, tok.vocab_size, max_windows=max_windows)
    return score(model, batches)["loss"]


def loss_cell(value) -> str:
    """Losses to 4 decimals, counts with thousands separators."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value if value is not None else "")


def report(out_dir: Path, title: str, rows: list[dict], notes: str, extra: dict | None = None) -> None:
    """table.md (title, table, notes) and results.json in `out_dir`; the table is printed for the README."""
    table = markdown_table(rows, cell=loss_cell)
    (out_dir / "table.md").write_text(f"### {title}\n\n{table}\n\n{notes}\n")
    (out_dir / "results.json").write_text(json.dumps({"title": title, "rows": rows, **(extra or {})}, indent=1) + "\n")
    print(f"\n### {title}\n\n{table}\n\n{notes}\n\n(written to {out_dir.relative_to(REPO)})")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
