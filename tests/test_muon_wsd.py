"""train.py with Muon and the wsd schedule, as users run it: exact resume with 1 and 2 processes, resharding 2 -> 1,
and the decay branch (bit for bit the run set to decay from the start; the origin's files untouched; its result a
normal checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from formats.checkpoint import checkpoint_name, load_model, save_weights
from tests.conftest import run_module, run_train, train_losses
from tests.test_train import expect_error, read_data, resume_from
from training.config import parse_config

STEPS = ["--max_steps=6", "--save_every=3", "--keep_last=0", "--eval_every=3"]
MUON_WSD = ["--optim.name=muon", "--optim.schedule=wsd"]  # decay_fraction 0.2 of 6 steps: the 6th step decays


@pytest.fixture(scope="module")
def muon_one(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("muon_one")
    run_train([f"--data={dataset}", f"--out_dir={out}", *STEPS, *MUON_WSD])
    return out


@pytest.fixture(scope="module")
def muon_two(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("muon_two")
    run_train([f"--data={dataset}", f"--out_dir={out}", *STEPS, *MUON_WSD, "--devices=2"])
    return out


@pytest.mark.parametrize("devices", [1, 2])
def test_muon_wsd_resume_is_exact(devices, muon_one, muon_two, tmp_path):
    full = muon_one if devices == 1 else muon_two
    out = resume_from(full, 3, tmp_path)
    run_train([f"--data={read_data(full)}", f"--out_dir={out}", *STEPS, *MUON_WSD, f"--devices={devices}"])
    resumed = train_losses(out)
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: train_losses(full)[s] for s in (4, 5, 6)}  # bit for bit


# 2 ranks sum their gradients in another order than 1 rank's backward does; Muon's bf16 Newton-Schulz carries that
# rounding into every element of the update, so 1- and 2-rank losses drift apart by about 1e-5 over 6 steps (AdamW's
# elementwise update keeps it smaller). A wrong exchange or resharding is off by far more (the losses move 1e-2 a step).
RESHARD_REL = 1e-4


def test_muon_reshards_from_two_processes_to_one(muon_one, muon_two, tmp_path):
    one, two = train_losses(muon_one), train_losses(muon_two)
    assert all(two[s] == pytest.approx(one[s], rel=RESHARD_REL) for s in one)
    out = resume_from(muon_two, 3, tmp_path)
    run_train([f"--data={read_data(muon_two)}", f"--out_dir={out}", *STEPS, *MUON_WSD, "--devices=1"])
    for step in (4, 5, 6):
        assert train_losses(out)[step] == pytest.approx(two[step], rel=RESHARD_REL)


def test_resuming_with_another_optimizer_is_refused(muon_one, tmp_path):
    out = resume_from(muon_one, 3, tmp_path)
    expect_error([f"--data={read_data(muon_one)}", f"--out_dir={out}", *STEPS], "written by optim.name muon")


def files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def val_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def test_decay_branch_is_the_run_set_to_decay_from_the_start(muon_one, dataset, tmp_path):
    """From step 3 of the stable phase, 2 decay steps: the same losses and weights as a 5-step run configured to
    decay over its last 2 steps, bit for bit; the origin's directory is left as it was."""
    before = files(muon_one)
    origin = muon_one / "checkpoints" / checkpoint_name(3)
    branch = tmp_path / "branch"
    run_module(["train.py", f"--branch_from={origin}", "--optim.decay_steps=2", f"--out_dir={branch}"])
    assert files(muon_one) == before

    planned = tmp_path / "planned"
    flags = ["--max_steps=5", "--save_every=3", "--keep_last=0", "--eval_every=3", "--optim.decay_steps=2"]
    run_train([f"--data={dataset}", f"--out_dir={planned}", *flags, *MUON_WSD])
    branched, expected = train_losses(branch), train_losses(planned)
    assert sorted(branched) == [4, 5] and branched == {s: expected[s] for s in (4, 5)}
    assert val_losses(branch)[5] == val_losses(planned)[5]
    end = checkpoint_name(5)
    (ours, state), (theirs, _) = load_model(branch / "checkpoints" / end), load_model(planned / "checkpoints" / end)
    assert state["step"] == 5 and state["config"]["branch_from"] == str(origin)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name

    # a normal checkpoint: tools.perplexity scores the decayed model (the run's own validation windows)
    args = ["-m", "tools.perplexity", "--checkpoint", str(branch / "checkpoints" / end), "--data", str(dataset)]
    scored = json.loads(run_module([*args, "--seq-len=32", "--max-windows=8"]).stdout.strip().splitlines()[-1])
    assert scored["loss"] == pytest.approx(val_losses(branch)[5], rel=1e-5)


def weights_only(checkpoint: Path, out: Path) -> Path:
    """A weights-only checkpoint of `checkpoint`'s model, as tools.average writes one."""
    model, state = load_model(checkpoint)
    save_weights(out, model.state_dict(), {"config": state["config"], "weights_only": True}, None)
    return out


def test_decay_branch_errors_name_the_path(muon_one, tmp_path):
    origin = muon_one / "checkpoints" / checkpoint_name(3)
    expect_error([f"--branch_from={origin}", f"--out_dir={muon_one}"], "needs an --out_dir of its own")
    out = f"--out_dir={tmp_path / 'branch'}"
    cases = [
        ([f"--branch_from={origin}"], "needs an --out_dir of its own"),
        ([f"--branch_from={tmp_path}", out], f"{tmp_path}: not a complete checkpoint"),
        ([f"--branch_from={origin}", out, "--model.n_layers=3"], "another model shape (model.n_layers: 3 != 2)"),
        ([f"--branch_from={muon_one / 'checkpoints' / checkpoint_name(6)}", out], "outside its run's stable phase"),
        ([f"--branch_from={weights_only(origin, tmp_path / 'average')}", out], "average: holds weights only"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_config(argv)
    assert not (tmp_path / "branch").exists()
