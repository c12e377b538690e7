"""train.py with a loss spike injected, for test_guard_e2e.py: `python tests/spike_worker.py STEPS [train.py args]`.

At the optimizer steps listed in STEPS (comma-separated, 1-based), rank 0 alone multiplies its training loss by 100
(so its gradients too): a spike only one rank sees, which every rank must skip. Each rank appends the steps whose
update it applied to `<out_dir>/applied.<rank>` (one number a line). Fabric's launcher re-runs this script for every
process it starts, so every rank is patched."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.fabric.wrappers import _FabricOptimizer

import train
from model.llama import Transformer
from training.loop import Progress

SPIKED = {int(s) for s in sys.argv[1].split(",")}
OUT_DIR = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--out_dir=")))
done = {"steps": 0, "in_train_step": False}  # optimizer steps done (the one being computed is the next)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def counting(method):
    def call(self, *args, **kwargs):
        method(self, *args, **kwargs)
        done["steps"] = self.step

    return call


def spiking(forward):
    def call(self, tokens, targets=None, *args, **kwargs):
        out = forward(self, tokens, targets, *args, **kwargs)
        if targets is not None and torch.is_grad_enabled() and done["steps"] + 1 in SPIKED and rank() == 0:
            out.loss = out.loss * 100
        return out

    return call


def in_train_step(train_step):
    def call(*args, **kwargs):
        done["in_train_step"] = True
        try:
            return train_step(*args, **kwargs)
        finally:
            done["in_train_step"] = False

    return call


def recording(step):
    """Records the steps of training, not the zero-gradient step that loading optimizer state takes to initialise it."""

    def call(self, *args, **kwargs):
        if done["in_train_step"]:
            with open(OUT_DIR / f"applied.{rank()}", "a") as f:
                f.write(f"{done['steps'] + 1}\n")
        return step(self, *args, **kwargs)

    return call


if __name__ == "__main__":
    Progress.advance = counting(Progress.advance)
    Progress.load_state_dict = counting(Progress.load_state_dict)
    Transformer.forward = spiking(Transformer.forward)
    _FabricOptimizer.step = recording(_FabricOptimizer.step)
    train.train_step = in_train_step(train.train_step)
    train.main(sys.argv[2:])  # sys.argv stays: Fabric's launcher starts the other ranks with it
