"""train.py end to end, as users run it: exact resume, 1 vs 2 processes, resharding, simulated multi-node,
preemption (SIGTERM), crashes (SIGKILL while saving), non-finite losses and bad input."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from formats.checkpoint import COMPLETE, complete_checkpoints
from tests.conftest import REPO, TINY_ARGS, free_port, read_metrics, run_train, subprocess_env, train_losses
from training.config import parse_config

STEPS = ["--max_steps=6", "--save_every=3", "--keep_last=0", "--eval_every=3"]


def checkpoints(out_dir: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(out_dir / "checkpoints")]


def resume_from(run: Path, step: int, out_dir: Path) -> Path:
    """A run directory holding only `run`'s checkpoint of `step`, as if it had been interrupted right after it."""
    name = f"step-{step:08d}"
    shutil.copytree(run / "checkpoints" / name, out_dir / "checkpoints" / name)
    return out_dir


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    run_train([f"--data={dataset}", f"--out_dir={out}", *STEPS])
    return out


@pytest.fixture(scope="module")
def two_processes(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    run_train([f"--data={dataset}", f"--out_dir={out}", *STEPS, "--devices=2"])
    return out


def test_run_writes_metrics_checkpoints_and_tensorboard(one_process):
    records = read_metrics(one_process)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "output_z_loss", "skipped_steps"} <= set(steps[0])
    assert steps[-1]["tokens"] == 6 * 8 * 32
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert all(r["val_bpb"] > 0 for r in records if "val_loss" in r)
    assert checkpoints(one_process) == ["step-00000003", "step-00000006"]
    assert list((one_process / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("devices", [1, 2])
def test_resume_is_exact(devices, one_process, two_processes, tmp_path):
    full = one_process if devices == 1 else two_processes
    out = resume_from(full, 3, tmp_path)
    run_train([f"--data={read_data(full)}", f"--out_dir={out}", *STEPS, f"--devices={devices}"])
    resumed = train_losses(out)
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: train_losses(full)[s] for s in (4, 5, 6)}  # bit for bit


def read_data(run: Path) -> str:
    import json

    state = json.loads((run / "checkpoints" / "step-00000003" / "train_state.json").read_text())
    return state["config"]["data"]


def test_output_z_loss_trains_log_z_down_and_leaves_the_loss_value_alone(dataset, one_process, tmp_path):
    """With a strong output z-loss (0.1), the first step's loss is the same cross-entropy bit for bit (the z-loss is
    logged apart, not added), and log²Z falls faster than without it at every step after (41.4 at the start; at
    step 6, 38.0 against 39.6 when measured)."""
    run_train([f"--data={dataset}", f"--out_dir={tmp_path}", *STEPS, "--optim.output_z_loss_coef=0.1"])
    with_z, without = read_metrics(tmp_path), read_metrics(one_process)
    assert with_z[1]["step"] == 1 and with_z[1]["loss"] == without[1]["loss"]
    assert with_z[1]["output_z_loss"] == without[1]["output_z_loss"]
    z, z_without = train_z(with_z), train_z(without)
    assert all(z[s] < z_without[s] for s in range(2, 7)) and z[6] < z_without[6] - 1


def train_z(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["output_z_loss"] for r in records if "output_z_loss" in r}


def test_two_processes_match_one(one_process, two_processes):
    one, two = train_losses(one_process), train_losses(two_processes)
    assert one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


@pytest.mark.parametrize("written_by, resumed_with", [(2, 1), (1, 2)])
def test_reshard_checkpoint_between_world_sizes(written_by, resumed_with, one_process, two_processes, tmp_path):
    source = two_processes if written_by == 2 else one_process
    out = resume_from(source, 3, tmp_path)
    run_train([f"--data={read_data(source)}", f"--out_dir={out}", *STEPS, f"--devices={resumed_with}"])
    for step in (4, 5, 6):
        assert train_losses(out)[step] == pytest.approx(train_losses(source)[step], rel=1e-5)


def torchrun_two_nodes(args: list[str]) -> None:
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "train.py",
                *TINY_ARGS,
                *args,
            ],
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def test_simulated_multi_node_torchrun_trains_checkpoints_and_resumes(dataset, two_processes, tmp_path):
    torchrun_two_nodes([f"--data={dataset}", f"--out_dir={tmp_path}", "--max_steps=3", *STEPS[1:]])
    shards = sorted(p.name for p in (tmp_path / "checkpoints" / "step-00000003").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    torchrun_two_nodes([f"--data={dataset}", f"--out_dir={tmp_path}", *STEPS])
    assert train_losses(tmp_path) == train_losses(two_processes)  # same world size, same order: bit for bit


def start_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", *TINY_ARGS, *args], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigterm_saves_a_checkpoint_and_exits_zero(dataset, one_process, tmp_path):
    proc = start_train([f"--data={dataset}", f"--out_dir={tmp_path}", "--max_steps=100000", "--eval_every=3",
                        "--save_every=0", "--optim.warmup_steps=2"])  # fmt: skip
    wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(train_losses(tmp_path)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = checkpoints(tmp_path)
    assert len(saved) == 1 and int(saved[0][5:]) == max(train_losses(tmp_path))


def test_sigkill_while_saving_leaves_a_resumable_run(dataset, one_process, tmp_path):
    args = [f"--data={dataset}", f"--out_dir={tmp_path}", *STEPS[1:], "--max_steps=6", "--save_every=1"]
    proc = start_train(args)
    wait_for(lambda: any((tmp_path / "checkpoints").glob(".step-*.tmp")) if (tmp_path / "checkpoints").exists()
             else False, proc)  # fmt: skip
    proc.kill()
    proc.wait()
    for partial in (tmp_path / "checkpoints").glob(".step-*.tmp"):
        assert not (partial / COMPLETE).exists()
    run_train(args)  # resume auto picks the newest complete checkpoint
    assert train_losses(tmp_path) == train_losses(one_process)


def test_partial_checkpoints_are_never_picked(one_process, tmp_path):
    out = resume_from(one_process, 3, tmp_path)
    partial = out / "checkpoints" / "step-00000005"
    shutil.copytree(one_process / "checkpoints" / "step-00000006", partial)
    (partial / COMPLETE).unlink()
    run_train([f"--data={read_data(one_process)}", f"--out_dir={out}", *STEPS])
    assert "step-00000006" in checkpoints(out)
    assert train_losses(out)[4] == train_losses(one_process)[4]  # resumed from step 3, not the partial step 5


def test_async_save_and_keep_last(dataset, one_process, tmp_path):
    run_train([f"--data={dataset}", f"--out_dir={tmp_path}", *STEPS, "--save_every=1", "--keep_last=2",
               "--async_save=true"])  # fmt: skip
    assert checkpoints(tmp_path) == ["step-00000005", "step-00000006"]
    assert train_losses(tmp_path) == train_losses(one_process)
    out = resume_from(tmp_path, 5, tmp_path / "resumed")
    run_train([f"--data={dataset}", f"--out_dir={out}", *STEPS])
    assert train_losses(out)[6] == train_losses(one_process)[6]


def test_non_finite_loss_stops_without_checkpoint(dataset, tmp_path):
    args = [f"--data={dataset}", "--max_steps=6", "--optim.lr=1e30", "--optim.warmup_steps=1", "--eval_every=0"]
    proc = run_train([*args, f"--out_dir={tmp_path}", "--save_every=1", "--optim.max_skipped_steps=0"], check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 2: update skipped (not finite: loss ") and "max_skipped_steps=0" in last
    assert checkpoints(tmp_path) == ["step-00000001"]  # nothing saved from the non-finite state
    out = tmp_path / "skip"
    proc = run_train([*args, f"--out_dir={out}", "--save_every=0", "--optim.max_skipped_steps=2"], check=False)
    assert "step 2: update skipped" in proc.stdout and "error: step 4: update skipped" in proc.stderr
    assert [(r["step"], r["skipped_steps"]) for r in read_metrics(out)] == [(1, 0), (2, 1), (3, 2), (4, 3)]


def expect_error(args: list[str], *fragments: str, **kwargs) -> None:
    proc = run_train(args, check=False, **kwargs)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), last


def test_config_errors_name_the_key(dataset, tmp_path):
    expect_error(["--model.n_layerz=3"], "n_layerz")
    expect_error(["--max_steps=x"], "max_steps")
    expect_error(["--global_batch_size=6", f"--data={dataset}", f"--out_dir={tmp_path}"], "global_batch_size")
    expect_error(["--config=configs/nope.yaml"], "nope.yaml")
    expect_error([f"--data={tmp_path / 'missing'}", f"--out_dir={tmp_path}"], "missing", "manifest")


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_parses_and_validates(config):
    cfg = parse_config([f"--config={REPO / 'configs' / config}"])  # parse_config validates
    assert cfg.config_name == config.removesuffix(".yaml")


def test_the_muon_preset_is_the_faithful_one_with_muon_and_wsd():
    names = ("tinyllama-1.1b", "tinyllama-1.1b-muon")
    faithful, muon = (parse_config([f"--config={REPO / 'configs' / name}.yaml"]).to_dict() for name in names)
    faithful["optim"].update(name="muon", schedule="wsd")
    assert {**muon, "config_name": None} == {**faithful, "config_name": None}


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}


def test_checkpoint_errors_leave_checkpoints_intact(one_process, tmp_path):
    data = f"--data={read_data(one_process)}"
    out = resume_from(one_process, 3, tmp_path / "shape")
    before = snapshot(out)
    expect_error([data, f"--out_dir={out}", "--model.n_layers=3", *STEPS], "model.n_layers: 3 != 2")
    expect_error([data, f"--out_dir={out}", "--model.num_experts=4", *STEPS], "model.num_experts: 4 != 0")
    expect_error([data, f"--out_dir={out}", "--resume=none", *STEPS], "already holds checkpoints")
    assert snapshot(out) == before

    expect_error([data, f"--out_dir={tmp_path / 'x'}", f"--resume={REPO / 'configs'}", *STEPS], "not a complete")
    truncated = resume_from(one_process, 3, tmp_path / "truncated")
    shard = truncated / "checkpoints" / "step-00000003" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    expect_error([data, f"--out_dir={truncated}", *STEPS], "step-00000003: damaged checkpoint")
    no_meta = resume_from(one_process, 3, tmp_path / "no_meta")
    (no_meta / "checkpoints" / "step-00000003" / ".metadata").unlink()
    expect_error([data, f"--out_dir={no_meta}", f"--resume={no_meta / 'checkpoints' / 'step-00000003'}", *STEPS],
                 ".metadata file is missing")  # fmt: skip


def test_launch_errors(dataset, tmp_path):
    expect_error([f"--data={dataset}", "--devices=512"], "devices=512")
    env = dict(subprocess_env(), NODE_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    expect_error([f"--data={dataset}", "--num_nodes=2", "--dist_timeout=2"], "no rendezvous", env=env)


def test_init_from_needs_data_in_its_tokenizer(one_process, tmp_path):
    from data.prepare import prepare
    from data.sources import stdlib_files

    other = tmp_path / "other"
    prepare(stdlib_files(packages=["json"]), other, vocab_size=600, val_fraction=0.2, progress=False)
    start = one_process / "checkpoints" / "step-00000006"
    expect_error([f"--data={other}", f"--out_dir={tmp_path / 'run'}", f"--init_from={start}"], "another tokenizer")
