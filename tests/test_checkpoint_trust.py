"""Nothing loaded from a checkpoint is trusted: crafted pickles, damaged or edited files, partial directories, a full
disk and a damaged Hugging Face directory each end in one error line naming the file, and run no code."""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata

from formats.checkpoint import (
    CHECKSUMS,
    METADATA,
    STATE_FILE,
    TOKENIZER,
    CheckpointError,
    checkpoint_name,
    complete_checkpoints,
    dcp_load,
    load_model,
    read_metadata,
    read_state,
    save_weights,
    tokenizer_path,
    write_checksums,
)
from formats.export import export
from model.llama import Transformer
from tests.conftest import run_module, run_train, tiny_config
from training.checkpoint import Checkpointer, load_training_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = ["--max_steps=4", "--save_every=2", "--keep_last=0", "--eval_every=0"]
SHARD = "__0_0.distcp"


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory) -> Path:
    """A run with complete checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    run_train([f"--data={dataset}", f"--out_dir={out}", *STEPS])
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run / "checkpoints", out / "checkpoints")
    return out


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / checkpoint_name(step)


def expect_error(proc, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in fragments), last


# 1. Code execution from a crafted .metadata


class Call:
    """Pickles as `function(*args)`: what an attacker's .metadata holds."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def metadata_that_runs(call: Call, genuine: Path) -> bytes:
    """A pickle that makes `call`, then returns the genuine metadata, so that a plain load goes on as usual."""
    body = pickle.dumps(pickle.loads(genuine.read_bytes()), protocol=2)[2:]  # without its PROTO opcode
    return b"\x80\x02" + pickle.dumps(call, protocol=2)[2:-1] + pickle.POP + body


def plant(checkpoint: Path, payload: bytes) -> None:
    """Replace .metadata and rewrite the checksums to match, as a forger would."""
    (checkpoint / METADATA).write_bytes(payload)
    write_checksums(checkpoint)


def test_crafted_metadata_runs_code_under_plain_pickle_and_is_refused_by_ours(run, tmp_path):
    marker = tmp_path / "MARKER"
    payloads = {
        "system": metadata_that_runs(Call(os.system, f"touch {marker}"), step_dir(run, 4) / METADATA),
        "exec": metadata_that_runs(Call(builtins.exec, f"open({str(marker)!r}, 'w')"), step_dir(run, 4) / METADATA),
    }
    for name, payload in payloads.items():
        assert isinstance(pickle.loads(payload), Metadata) and marker.is_file()  # what FileSystemReader would do
        marker.unlink()
        file = tmp_path / f"{name}.metadata"
        file.write_bytes(payload)
        with pytest.raises(CheckpointError, match=rf"{file}: refused to unpickle \w+\.(system|exec):"):
            read_metadata(file)
        assert not marker.exists()


@pytest.fixture(scope="module")
def planted(run, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the run whose newest checkpoint's .metadata runs `touch MARKER` and then returns valid metadata."""
    root = tmp_path_factory.mktemp("planted")
    out, marker = copy_run(run, root), root / "MARKER"
    plant(step_dir(out, 4), metadata_that_runs(Call(os.system, f"touch {marker}"), step_dir(run, 4) / METADATA))
    return out, marker


@pytest.mark.parametrize(
    "command",
    ["resume", "init_from", "export", "perplexity", "generate", "average", "interpolate"],
)
def test_no_command_runs_the_code_of_a_crafted_metadata(planted, dataset, tmp_path, command):
    out, marker = planted
    ckpt, older = step_dir(out, 4), str(step_dir(out, 2))
    args = {
        "resume": ["train.py", f"--data={dataset}", f"--out_dir={out}", "--max_steps=6"],
        "init_from": ["train.py", f"--data={dataset}", f"--out_dir={tmp_path}", f"--init_from={ckpt}"],
        "export": ["-m", "tools.export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf")],
        "perplexity": ["-m", "tools.perplexity", "--checkpoint", str(ckpt), "--data", str(dataset)],
        "generate": ["-m", "tools.generate", "--checkpoint", str(ckpt), "--prompt", "def"],
        "average": ["-m", "tools.average", str(ckpt), older, "--output", str(tmp_path / "avg")],
        "interpolate": ["-m", "tools.average", "--interpolate", older, str(ckpt), "--data", str(dataset)],
    }[command]
    proc = run_train(args[1:], check=False) if args[0] == "train.py" else run_module(args, check=False)
    expect_error(proc, str(ckpt / METADATA), "refused to unpickle")
    assert not marker.exists()


def test_optimizer_items_are_unpickled_weights_only(tmp_path):
    marker = tmp_path / "MARKER"
    save_weights(tmp_path / "ckpt", {"x": Call(os.system, f"touch {marker}")}, {"config": {}}, None)
    with pytest.raises(CheckpointError, match="shards cannot be read"):
        dcp_load({"x": None}, tmp_path / "ckpt")
    assert not marker.exists()


# 3. A directory at the target name without COMPLETE


def test_resume_saves_over_an_incomplete_directory_of_the_same_step(run, dataset, tmp_path):
    out = copy_run(run, tmp_path)
    step_dir(out, 4).rename(step_dir(out, 6))
    (step_dir(out, 6) / "COMPLETE").unlink()  # as if killed between renaming and marking (or copied in part)
    proc = run_train([f"--data={dataset}", f"--out_dir={out}", "--max_steps=6", *STEPS[1:]])
    assert f"resumed from {step_dir(out, 2)} at step 2" in proc.stdout
    assert f"{step_dir(out, 6)}: removed an incomplete checkpoint" in proc.stderr
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == [checkpoint_name(s) for s in (2, 4, 6)]
    assert read_state(step_dir(out, 6))["step"] == 6


# 4. Damaged files are caught by the checksums; old checkpoints load unverified


def flip_bytes(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset : offset + 4] = bytes(b ^ 0xFF for b in data[offset : offset + 4])
    file.write_bytes(bytes(data))


def test_flipped_or_truncated_shard_is_an_error_naming_it(run, tmp_path):
    ckpt = shutil.copytree(step_dir(run, 4), tmp_path / checkpoint_name(4))
    shard = ckpt / SHARD
    flip_bytes(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{ckpt}: damaged checkpoint, {SHARD} does not match its checksum"):
        load_model(ckpt)
    shard.write_bytes(shard.read_bytes()[:500_000])
    with pytest.raises(CheckpointError, match=rf"{ckpt}: damaged checkpoint, {SHARD} has 500000 bytes where \d+ were"):
        load_model(ckpt)


def test_edited_state_or_tokenizer_or_unlisted_shard_is_an_error(run, tmp_path):
    ckpt = shutil.copytree(step_dir(run, 4), tmp_path / checkpoint_name(4))
    checksums = json.loads((ckpt / CHECKSUMS).read_text())["files"]
    assert set(checksums) == {METADATA, SHARD, STATE_FILE, TOKENIZER}
    flip_bytes(ckpt / TOKENIZER, 100)
    with pytest.raises(CheckpointError, match=rf"{ckpt}: damaged checkpoint, {TOKENIZER} does not match"):
        tokenizer_path(ckpt)
    (ckpt / STATE_FILE).write_text((ckpt / STATE_FILE).read_text().replace('"tokens": ', '"tokens": 1'))
    with pytest.raises(CheckpointError, match=rf"{ckpt}: damaged checkpoint, {STATE_FILE} has"):
        read_state(ckpt)
    shutil.copyfile(step_dir(run, 4) / STATE_FILE, ckpt / STATE_FILE)
    shutil.move(ckpt / SHARD, ckpt / "__9_0.distcp")  # a shard the metadata names but the checksums do not
    (ckpt / METADATA).write_bytes((ckpt / METADATA).read_bytes().replace(SHARD.encode(), b"__9_0.distcp"))
    plant(ckpt, (ckpt / METADATA).read_bytes())
    checksums = json.loads((ckpt / CHECKSUMS).read_text())
    del checksums["files"]["__9_0.distcp"]
    (ckpt / CHECKSUMS).write_text(json.dumps(checksums))
    with pytest.raises(CheckpointError, match=rf"{ckpt}: damaged checkpoint, __9_0.distcp is not covered"):
        load_model(ckpt)


def test_damaged_shard_stops_resume_and_tools(run, dataset, tmp_path):
    out = copy_run(run, tmp_path)
    shard = step_dir(out, 4) / SHARD
    flip_bytes(shard, shard.stat().st_size // 2)
    message = f"{step_dir(out, 4)}: damaged checkpoint, {SHARD} does not match its checksum"
    expect_error(run_train([f"--data={dataset}", f"--out_dir={out}", "--max_steps=6"], check=False), message)
    ppl = ["-m", "tools.perplexity", "--checkpoint", str(step_dir(out, 4)), "--data", str(dataset)]
    expect_error(run_module(ppl, check=False), message)


def test_checkpoint_without_checksums_loads_with_a_warning(run, tmp_path, capsys):
    ckpt = shutil.copytree(step_dir(run, 4), tmp_path / checkpoint_name(4))
    (ckpt / CHECKSUMS).unlink()
    expected, _ = load_model(step_dir(run, 4))
    capsys.readouterr()
    model, _ = load_model(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {ckpt}: no {CHECKSUMS} (written before checksums were recorded): unverified"]


# 6. An edited train_state.json (its checksums rewritten to match) must agree with its directory and data position


def edit_state(ckpt: Path, edit) -> None:
    state = json.loads((ckpt / STATE_FILE).read_text())
    edit(state)
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    write_checksums(ckpt)


def test_edited_step_stops_resume(run, dataset, tmp_path):
    out = copy_run(run, tmp_path)
    edit_state(step_dir(out, 4), lambda s: s.update(step=1))
    proc = run_train([f"--data={dataset}", f"--out_dir={out}", "--max_steps=6"], check=False)
    expect_error(proc, str(step_dir(out, 4) / STATE_FILE), "'step' is 1")


def test_state_must_agree_with_the_data_position(run, tmp_path):
    ckpt = shutil.copytree(step_dir(run, 4), tmp_path / checkpoint_name(4))
    edit_state(ckpt, lambda s: s["data"].update(samples=8, per_dataset=[8]))
    with pytest.raises(CheckpointError, match=rf"{ckpt / STATE_FILE}: 'data.samples' is 8, not .* = 32"):
        read_state(ckpt)
    edit_state(ckpt, lambda s: s["data"].update(samples=32, per_dataset=[16]))
    with pytest.raises(CheckpointError, match=r"'data.samples' is 32, but 'data.per_dataset' sums to 16"):
        read_state(ckpt)
    edit_state(ckpt, lambda s: s.pop("data"))
    with pytest.raises(CheckpointError, match=rf"{ckpt / STATE_FILE}: damaged checkpoint state \(no 'data'\)"):
        read_state(ckpt)


# 7/8. A full disk while saving, a 0-byte .metadata, a garbage model.safetensors


def train_state(step: int) -> dict:
    cfg = tiny_config()
    return {
        "step": step,
        "tokens": step * 8 * 32,
        "nan_skipped": 0,
        "data": {"seed": 0, "samples": step * 8, "per_dataset": [step * 8]},
        "config": {"model": cfg.to_dict(), "global_batch_size": 8, "seq_len": 32},
    }


class FullDisk:
    """A writable stream on a disk that fills after `room` bytes."""

    def __init__(self, stream, room: int) -> None:
        self.stream, self.room = stream, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def fill_disk_after(monkeypatch, room: int) -> None:
    real = FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            yield FullDisk(stream, room) if "w" in mode else stream

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)


@pytest.mark.parametrize("async_save", [False, True])
def test_save_on_a_full_disk_is_one_error_and_leaves_older_checkpoints(tmp_path, monkeypatch, async_save):
    model = Transformer(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointer = Checkpointer(tmp_path, keep_last=1, async_save=async_save, rank=0, tokenizer=None)
    checkpointer.save(2, model, optimizer, train_state(2))
    checkpointer.wait()
    fill_disk_after(monkeypatch, room=100_000)
    final = step_dir(tmp_path, 4)
    with pytest.raises(CheckpointError) as e:
        checkpointer.save(4, model, optimizer, train_state(4))
        checkpointer.wait()  # where a background save's error surfaces
    assert str(e.value) == (
        f"{final}: not saved, no space left on device (its partial directory was removed; "
        "older checkpoints were not touched)"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [checkpoint_name(2)]
    monkeypatch.undo()
    assert load_training_state(step_dir(tmp_path, 2), tiny_config(), model, optimizer, "adamw")["step"] == 2


def test_empty_metadata_is_one_error_line(run, dataset, tmp_path):
    ckpt = shutil.copytree(step_dir(run, 4), tmp_path / checkpoint_name(4))
    (ckpt / METADATA).write_bytes(b"")
    (ckpt / CHECKSUMS).unlink()  # as in a checkpoint written before checksums: only the unpickler sees the damage
    proc = run_module(["-m", "tools.perplexity", "--checkpoint", str(ckpt), "--data", str(dataset)], check=False)
    expect_error(proc, f"{ckpt / METADATA}: damaged checkpoint metadata")


def test_garbage_safetensors_under_init_from_is_one_error_line(run, dataset, tmp_path):
    hf = tmp_path / "hf"
    export(step_dir(run, 4), hf, torch.float32)
    (hf / "model.safetensors").write_bytes(b"not safetensors" * 100)
    proc = run_train([f"--data={dataset}", f"--out_dir={tmp_path / 'out'}", f"--init_from={hf}"], check=False)
    expect_error(proc, f"{hf / 'model.safetensors'}: not a readable safetensors file")
