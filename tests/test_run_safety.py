"""Trust nothing that is loaded: one run per out_dir, a tokenizer switched under a resume, Ctrl-C, a full disk, and
bad values, each a one-line error (no traceback) with nothing already written lost."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from formats.checkpoint import complete_checkpoints
from tests.conftest import run_module, run_train, train_losses
from tests.test_train import checkpoints, expect_error, resume_from, start_train, wait_for

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def last_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory) -> Path:
    """A finished 2-step run with one checkpoint, step 2."""
    out = tmp_path_factory.mktemp("run")
    run_train([f"--data={dataset}", f"--out_dir={out}", "--max_steps=2", "--eval_every=0"])
    return out


def long_run(dataset: Path, out_dir: Path) -> list[str]:
    return [f"--data={dataset}", f"--out_dir={out_dir}", "--max_steps=100000", "--eval_every=0", "--save_every=2"]


def test_a_second_run_on_one_out_dir_is_refused_and_a_killed_runs_lock_is_taken_over(dataset, tmp_path):
    first = start_train(long_run(dataset, tmp_path))
    wait_for(lambda: bool(complete_checkpoints(tmp_path / "checkpoints")), first)
    try:
        started = time.monotonic()
        second = start_train(long_run(dataset, tmp_path))
        _, err = second.communicate(timeout=120)
        assert second.returncode != 0 and time.monotonic() - started < 60
        line = last_error_line(err)
        assert line.startswith("error: ") and f"pid {first.pid} on {socket.gethostname()}" in line, line
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    newest = int(checkpoints(tmp_path)[-1][5:])
    resumed = run_train([f"--data={dataset}", f"--out_dir={tmp_path}", f"--max_steps={newest + 1}", "--eval_every=0"])
    assert f"taking over the stale lock {tmp_path / 'run.lock'}" in resumed.stderr
    assert f"pid {first.pid}" in resumed.stderr
    assert f"resumed from {tmp_path / 'checkpoints' / f'step-{newest:08d}'}" in resumed.stdout
    assert not (tmp_path / "run.lock").exists()  # released at the end


def test_a_lock_held_on_another_host_is_refused_with_how_to_remove_it(dataset, tmp_path):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"host": "node-17", "pid": 1234, "started": "2026-12-01 10:00:00 UTC"}))
    expect_error(long_run(dataset, tmp_path), "pid 1234 on node-17", f"remove {lock}")
    assert lock.exists()


def test_resume_with_data_of_another_tokenizer_is_refused(run_dir, tmp_path):
    from data.prepare import prepare
    from data.sources import stdlib_files

    other = tmp_path / "other"
    prepare(stdlib_files(packages=["json"]), other, vocab_size=500, val_fraction=0.2, progress=False)
    out = resume_from(run_dir, 2, tmp_path / "run")
    checkpoint = out / "checkpoints" / "step-00000002"
    expect_error([f"--data={other}", f"--out_dir={out}", "--max_steps=4"], str(other), str(checkpoint))
    assert checkpoints(out) == ["step-00000002"]


def test_an_out_dir_that_is_a_file_is_a_one_line_error(dataset, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep me\n")
    expect_error([f"--data={dataset}", f"--out_dir={a_file}"], str(a_file), "not a directory")
    expect_error([f"--data={dataset}", f"--out_dir={a_file / 'run'}"], str(a_file / "run"), "cannot write")
    assert a_file.read_text() == "keep me\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_dir_is_a_one_line_error(dataset, run_dir, tmp_path):
    for out in (tmp_path / "new", resume_from(run_dir, 2, tmp_path / "resumed")):
        out.mkdir(exist_ok=True)
        out.chmod(0o555)
        try:
            expect_error([f"--data={dataset}", f"--out_dir={out}", "--max_steps=4"], str(out), "ermission denied")
        finally:
            out.chmod(0o755)


def test_bad_config_values_name_the_key(dataset, tmp_path):
    expect_error(["--log_every=0"], "log_every must be positive, got 0")
    expect_error(["--eval_windows=0"], "eval_windows must be positive, got 0")
    expect_error(["--eval_every=-1"], "eval_every must be 0 or positive, got -1")


def test_eval_windows_is_not_checked_with_evaluation_off():
    from training.config import parse_config

    assert parse_config(["--eval_windows=0", "--eval_every=0"]).eval_windows == 0


def signalled_run(dataset: Path, out_dir: Path, signals: int):
    proc = start_train(long_run(dataset, out_dir))
    wait_for(lambda: (out_dir / "metrics.jsonl").exists() and len(train_losses(out_dir)) >= 2, proc)
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    started = time.monotonic()
    out, err = proc.communicate(timeout=120)
    return proc, out, err, time.monotonic() - started


def test_ctrl_c_saves_a_checkpoint_and_exits_like_sigterm(dataset, tmp_path):
    proc, out, err, _ = signalled_run(dataset, tmp_path, signals=1)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGINT: saved a checkpoint" in out
    assert int(checkpoints(tmp_path)[-1][5:]) == max(train_losses(tmp_path))
    assert not (tmp_path / "run.lock").exists()


def test_a_second_ctrl_c_stops_at_once(dataset, tmp_path):
    proc, _, err, seconds = signalled_run(dataset, tmp_path, signals=2)
    assert proc.returncode == 130 and seconds < 10, err[-3000:]
    assert last_error_line(err).startswith("error: interrupted")
    assert not (tmp_path / "run.lock").exists()
    steps = max(train_losses(tmp_path)) + 1
    run_train([f"--data={dataset}", f"--out_dir={tmp_path}", f"--max_steps={steps}", "--eval_every=0"])  # resumable


# Tools, called in-process: a full disk is simulated by a writer that raises ENOSPC.


def tool_error(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code) if isinstance(exit_.value.code, str) else last_error_line(capsys.readouterr().err)
    assert "\n" not in message and message.startswith("error: "), message
    return message


class FullDiskOpen:
    """`open` for data.shards whose shard files fill the disk after `budget` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" in mode:
            real_write = f.write

            def write(data: bytes) -> int:
                self.budget -= len(data)
                if self.budget < 0:
                    raise ENOSPC
                return real_write(data)

            f.write = write
        return f


def test_prepare_on_a_full_disk_removes_the_partial_shard(dataset, monkeypatch, capsys, tmp_path):
    import data.shards
    from data.prepare import main
    from data.sources import stdlib_files

    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in stdlib_files(packages=["json"]):
        shutil.copy(f, inputs / f.name)
    argv = ["--input", str(inputs), "--output", str(tmp_path / "out"), f"--tokenizer={dataset}", "--shard-mb=0.01"]
    monkeypatch.setattr(data.shards, "open", FullDiskOpen(budget=20_000), raising=False)
    message = tool_error(main, argv, capsys)
    assert "no space left on device" in message and ".bin" in message and "nothing older was touched" in message
    finished = sorted(p.name for p in (tmp_path / "out").glob("*.bin"))
    assert finished and not list((tmp_path / "out").glob("*.tmp"))
    monkeypatch.undo()
    main(argv)  # the finished shards are kept, the rest is written now
    assert set(finished) <= {p.name for p in (tmp_path / "out").glob("*.bin")}


def test_a_full_disk_keeps_an_older_manifest(monkeypatch, tmp_path):
    from data.shards import DataError, write_json_atomic

    manifest = tmp_path / "manifest.json"
    write_json_atomic(manifest, {"version": 1})

    def full_disk(path: Path, text: str, *args, **kwargs) -> None:
        with open(path, "w") as f:
            f.write(text[:3])
        raise ENOSPC

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(DataError, match="manifest.json: no space left on device; removed the partial manifest.json"):
        write_json_atomic(manifest, {"version": 2})
    monkeypatch.undo()
    assert json.loads(manifest.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == [manifest.name]


def test_export_on_a_full_disk_keeps_the_older_export(run_dir, monkeypatch, capsys, tmp_path):
    import formats.export
    import tools.export

    checkpoint, output = run_dir / "checkpoints" / "step-00000002", tmp_path / "hf"
    tools.export.main(["--checkpoint", str(checkpoint), "--output", str(output), "--dtype=fp32"])
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    umask = os.umask(0o022)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in output.iterdir()} == {oct(0o666 & ~umask)}

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise ENOSPC

    monkeypatch.setattr(formats.export, "save_file", full_disk)
    argv = ["--checkpoint", str(checkpoint), "--output", str(output), "--overwrite"]
    message = tool_error(tools.export.main, argv, capsys)
    assert "model.safetensors: no space left on device" in message and "nothing older was touched" in message
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no staging directory left


def test_average_on_a_full_disk_keeps_the_older_average(run_dir, monkeypatch, capsys, tmp_path):
    import formats.average
    import tools.average

    checkpoint, output = str(run_dir / "checkpoints" / "step-00000002"), tmp_path / "avg"
    tools.average.main([checkpoint, checkpoint, "--output", str(output)])
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def full_disk(path, weights, state, tokenizer):
        Path(path).mkdir()
        (Path(path) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(path) / "__0_0.distcp"))

    monkeypatch.setattr(formats.average, "save_weights", full_disk)
    message = tool_error(tools.average.main, [checkpoint, checkpoint, "--output", str(output), "--overwrite"], capsys)
    assert "__0_0.distcp: no space left on device" in message and "nothing older was touched" in message
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["avg"]


def test_export_rejects_a_bad_max_shard_size(run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    for size in ("0", "-5", "abc"):
        proc = run_module(["-m", "tools.export", f"--checkpoint={checkpoint}", f"--output={tmp_path / size}",
                           f"--max-shard-size={size}"], check=False)  # fmt: skip
        assert proc.returncode != 0 and "argument --max-shard-size" in last_error_line(proc.stderr)


def test_generate_rejects_bad_sampling_values(run_dir, capsys):
    from tools.generate import main

    checkpoint = str(run_dir / "checkpoints" / "step-00000002")
    for flag in ("--top-k=-5", "--temperature=-1", "--max-new-tokens=-3", "--top-p=0"):
        with pytest.raises(SystemExit) as exit_:
            main(["--checkpoint", checkpoint, "--prompt=def ", flag])
        assert exit_.value.code == 2  # argparse's usage line, then its one error line
        assert f"error: argument {flag.split('=')[0]}: must be " in last_error_line(capsys.readouterr().err)


def test_perplexity_of_an_empty_text_file_is_an_error(run_dir, capsys, tmp_path):
    from tools.perplexity import main

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    message = tool_error(main, ["--checkpoint", str(run_dir / "checkpoints" / "step-00000002"), "--text-file",
                                str(empty)], capsys)  # fmt: skip
    assert message == f"error: no tokens to score in {empty}"


def test_damaged_inputs_name_the_file(dataset, capsys, tmp_path):
    from data.prepare import main

    text = "".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(500)).encode()
    truncated = tmp_path / "in" / "part.jsonl.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(gzip.compress(text)[:2000])
    bad_parquet = tmp_path / "bad" / "part.parquet"
    bad_parquet.parent.mkdir()
    bad_parquet.write_bytes(b"not parquet" * 10)
    for source in (truncated, bad_parquet):
        for i, tokenizer in enumerate(("--vocab-size=300", f"--tokenizer={dataset / 'tokenizer.model'}")):
            argv = ["--input", str(source), "--output", str(tmp_path / f"out{i}{source.suffix}"), tokenizer]
            assert tool_error(main, argv, capsys).startswith(f"error: {source}: cannot read")


def test_tokenizer_training_failures_give_a_reason(tmp_path):
    from data.tokenizer import train_tokenizer

    with pytest.raises(ValueError, match="pieces: the input holds no text$"):
        train_tokenizer(iter([""]), 300, tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        train_tokenizer(iter(["ab"]), 300, tmp_path / "tokenizer.model")
