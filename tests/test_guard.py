"""The loss-spike guard (training/guard.py) against the rule written out plainly with lists and the statistics
module; its state through JSON, as a checkpoint carries it; its config keys' errors; and end to end in train.py on
2 processes, with a spike injected on one rank (tests/spike_worker.py)."""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
from pathlib import Path

import pytest
from jsonargparse import ArgumentError

from tests.conftest import REPO, TINY_ARGS, read_metrics, run_module, train_losses
from tests.test_train import resume_from
from training.config import OptimConfig, parse_config
from training.guard import SpikeGuard


def reference_skips(steps: list[tuple[float, float]], sigmas: float | None, window: int) -> list[bool]:
    """Per step, whether its update is skipped: a non-finite loss or gradient norm, or (with sigmas) either one above
    the mean + sigmas sample standard deviations of the last `window` accepted steps, once there are that many."""
    accepted: list[tuple[float, float]] = []
    skips = []
    for step in steps:
        recent = accepted[-window:]
        skip = not all(math.isfinite(v) for v in step)
        if not skip and sigmas is not None and len(recent) == window:
            for i, value in enumerate(step):
                column = [r[i] for r in recent]
                skip = skip or value > statistics.mean(column) + sigmas * statistics.stdev(column)
        skips.append(skip)
        if not skip:
            accepted.append(step)
    return skips


def noisy_run(n: int, seed: int) -> list[tuple[float, float]]:
    """(loss, gradient norm) of a run whose loss falls with noise, with single spikes, a burst of spikes, slow
    rises and non-finite steps mixed in."""
    rng = random.Random(seed)
    steps = []
    for i in range(n):
        loss = 3 + 5 * math.exp(-i / 60) + rng.gauss(0, 0.05)
        norm = 0.5 + 0.2 * rng.random() + i / 1000
        if rng.random() < 0.05:
            loss *= rng.uniform(1.01, 2)
        if rng.random() < 0.05:
            norm *= rng.uniform(1.5, 10)
        if 200 <= i < 208:  # a burst of bad batches
            loss += 3
        if rng.random() < 0.02:
            loss, norm = rng.choice([(math.nan, norm), (loss, math.inf), (-math.inf, math.nan)])
        steps.append((loss, norm))
    return steps


@pytest.mark.parametrize("sigmas, window", [(None, 16), (2.0, 2), (3.0, 16), (6.0, 128)])
def test_guard_skips_what_the_plain_rule_skips(sigmas, window):
    steps = noisy_run(400, seed=window)
    expected = reference_skips(steps, sigmas, window)
    guard = SpikeGuard(sigmas, window)
    assert [guard.check(*step) is not None for step in steps] == expected
    assert guard.skipped == sum(expected)
    assert sum(expected) > (8 if sigmas else 0)  # non-finite steps always; spikes too with sigmas
    if sigmas is not None and window < 128:
        assert all(expected[200:208])  # a burst is skipped whole: skipped spikes never widen the band


def test_guard_state_through_json_continues_exactly():
    """Halfway, the state goes through JSON (as train_state.json) into a new guard: the decisions that follow and the
    count are those of the uninterrupted guard; a longer saved window keeps its newest values."""
    steps = noisy_run(300, seed=1)
    whole = SpikeGuard(3.0, 16)
    expected = [whole.check(*step) for step in steps]
    first = SpikeGuard(3.0, 16)
    decisions = [first.check(*step) for step in steps[:150]]
    resumed = SpikeGuard(3.0, 16)
    resumed.load_state_dict(json.loads(json.dumps({"step": 150, **first.state_dict()})))
    decisions += [resumed.check(*step) for step in steps[150:]]
    assert decisions == expected and resumed.skipped == whole.skipped
    shorter = SpikeGuard(3.0, 4)
    shorter.load_state_dict(first.state_dict())
    assert list(shorter.recent["loss"]) == list(first.recent["loss"])[-4:]


def test_guard_extra_values_need_only_be_finite():
    guard = SpikeGuard(None, 2)
    assert guard.check(2.0, 1.0, 0.1) is None
    assert "auxiliary losses [inf]" in guard.check(2.0, 1.0, math.inf)
    assert list(guard.recent["loss"]) == [2.0] and guard.skipped == 1


def test_a_checkpoint_from_before_the_guard_loads():
    """train_state.json of earlier versions has `nan_skipped` and no window: the count carries over."""
    guard = SpikeGuard(6.0, 8)
    guard.load_state_dict({"step": 4, "tokens": 1024, "nan_skipped": 2})
    assert guard.skipped == 2 and not guard.recent["loss"] and guard.limit("loss") is None


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("spike_sigmas", 0.0, "optim.spike_sigmas must be positive"),
        ("spike_sigmas", -1.0, "optim.spike_sigmas must be positive"),
        ("spike_window", 1, "optim.spike_window must be at least 2"),
        ("max_skipped_steps", -1, "optim.max_skipped_steps must be 0 or positive"),
        ("output_z_loss_coef", -1e-4, "optim.output_z_loss_coef must be 0 or positive"),
        ("output_z_loss_coef", math.nan, "optim.output_z_loss_coef must be 0 or positive"),
    ],
)
def test_bad_guard_and_z_loss_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**{key: value}).validate()
    if not math.isnan(value):  # the command line refuses nan by itself
        with pytest.raises(ValueError, match=message):  # as train.py parses it
            parse_config([f"--optim.{key}={value}"])


def test_the_replaced_skip_nan_batches_names_its_successor():
    with pytest.raises(ArgumentError, match="skip_nan_batches is now optim.max_skipped_steps"):
        parse_config(["--skip_nan_batches=2"])


GUARD = ["--optim.spike_window=3", "--optim.spike_sigmas=30"]
RUN = ["--max_steps=8", "--save_every=4", "--keep_last=0", "--eval_every=0", "--devices=2", *GUARD]


def spiked_run(dataset: Path, out_dir: Path, spiked_steps: str) -> subprocess.CompletedProcess:
    args = [*TINY_ARGS, f"--data={dataset}", f"--out_dir={out_dir}", *RUN]
    return run_module([str(REPO / "tests" / "spike_worker.py"), spiked_steps, *args])


def applied(out_dir: Path, rank: int) -> list[int]:
    return [int(line) for line in (out_dir / f"applied.{rank}").read_text().split()]


def test_a_spike_seen_by_one_rank_is_skipped_by_both_logged_and_resumed_across_exactly(dataset, tmp_path):
    """Rank 0 alone sees a 100x loss at steps 4 and 7 (window 3, 30 sigmas): neither rank applies those updates, the
    count and the stdout line record them, the checkpoint of step 4 holds the window of steps 1-3 (the spike left
    out), and resuming from it gives steps 5-8 bit for bit, the second spike skipped again."""
    full = tmp_path / "full"
    proc = spiked_run(dataset, full, "4,7")
    assert applied(full, 0) == applied(full, 1) == [1, 2, 3, 5, 6, 8]
    records = {r["step"]: r for r in read_metrics(full) if "loss" in r}  # training steps, not checkpoint records
    assert [records[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert "step 4: update skipped (loss " in proc.stdout and "step 7: update skipped (loss " in proc.stdout
    state = json.loads((full / "checkpoints" / "step-00000004" / "train_state.json").read_text())
    assert state["skipped_steps"] == 1
    assert state["spike_window"]["loss"] == [records[s]["loss"] for s in (1, 2, 3)]

    resumed = resume_from(full, 4, tmp_path / "resumed")
    spiked_run(dataset, resumed, "4,7")
    assert applied(resumed, 0) == applied(resumed, 1) == [5, 6, 8]
    assert {s: train_losses(resumed)[s] for s in (5, 6, 7, 8)} == {s: records[s]["loss"] for s in (5, 6, 7, 8)}
    assert [r for r in read_metrics(resumed) if "loss" in r][-1]["skipped_steps"] == 2
