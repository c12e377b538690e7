"""Tokenizer, shard preparation and the data order: round trips, determinism, resume, bad input."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from data.prepare import prepare
from data.shards import HEADER, DataError, read_header, read_manifest
from data.sources import read_documents, stdlib_files
from data.stream import DataState, RankBatches, TokenStream, WindowOrder, batch_quotas, open_streams, train_loader
from data.tokenizer import TextBytes, Tokenizer
from tests.conftest import run_module

CODE = 'def f(x):\n\tif x:\n        return "ünïcode ✓ 123"\n\n\nclass A:  # trailing  \n    pass\n'


def test_tokenizer_round_trip(dataset):
    tok = Tokenizer(dataset / "tokenizer.model")
    assert (tok.vocab_size, tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (512, 0, 1, 2)
    for text in [CODE, "  leading spaces", "emoji 🦙 and bytes \x00\x7f", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("x", bos=True)[0] == 1 and tok.encode("x", eos=True)[-1] == 2


def test_text_bytes_add_up_to_each_documents_utf8_size(dataset):
    """Every document of the prepared package (and some edge cases: non-ASCII, byte-fallback characters, leading
    spaces, empty), scored after an EOS as in a token stream, stands for its UTF-8 size in bytes; with BOS in front
    (a text file) too."""
    tok = Tokenizer(dataset / "tokenizer.model")
    text_bytes = TextBytes(tok)
    documents = [doc for path in stdlib_files(packages=["email"]) for doc in read_documents(path)]
    for doc in [*documents, CODE, "  leading spaces", "emoji 🦙 and bytes \x00\x7f", "", "\n"]:
        for start in (tok.eos_id, tok.bos_id):
            ids = torch.tensor([start, *tok.encode(doc), tok.eos_id])
            assert int(text_bytes.count(ids[None, :-1], ids[None, 1:])) == len(doc.encode()), doc[:40]
    ids = torch.tensor([tok.eos_id, *tok.encode(CODE)])
    targets = ids[1:].clone()
    targets[5:] = -100  # only the first 5 tokens are scored: the bytes of their text
    assert int(text_bytes.count(ids[None, :-1], targets[None])) == len(tok.decode(ids[1:6].tolist()).encode())


def test_prepare_writes_shards_manifest_and_every_window_once_per_epoch(dataset):
    manifest = read_manifest(dataset)
    assert manifest["dtype"] == "uint16" and manifest["tokens"]["val"] > 0
    for split in ("train", "val"):
        for shard in manifest["splits"][split]:
            header = read_header(dataset / shard["file"])
            assert header.n_tokens == shard["tokens"] and header.vocab_size == 512
    stream = TokenStream(dataset, "train")
    eos_count = int(sum((np.asarray(s) == 2).sum() for s in stream.shards))
    assert eos_count > 10  # one EOS per document, no padding

    seq = 64
    n = stream.n_windows(seq)
    state = DataState(seed=5)
    loader = train_loader([stream], [1.0], state, seq, 512, global_batch_size=8, micro_batch=4, rank=0, world=1)
    seen = []
    batches = iter(loader)
    for _ in range(-(-n // 4)):
        seen.extend(next(batches).tolist())
    expected = {tuple(stream.read(w * seq, seq + 1).tolist()) for w in range(n)}
    assert {tuple(s) for s in seen[:n]} == expected  # the first epoch is every window exactly once


def test_window_order_is_a_permutation_and_depends_on_seed_and_epoch():
    for n in (1, 2, 7, 1000, 4097):
        assert sorted(WindowOrder(n, 3, 0, 0)(np.arange(n)).tolist()) == list(range(n))
    a, b, c = (WindowOrder(1000, s, 0, e)(np.arange(1000)) for s, e in ((1, 0), (1, 1), (2, 0)))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def rank_samples(batches: RankBatches, n: int) -> list:
    it = iter(batches)
    return [next(it) for _ in range(n)]


def test_loader_is_deterministic_and_resumes_mid_epoch_exactly():
    quotas, n_windows = batch_quotas([1.0], 8), [37]
    full = rank_samples(RankBatches(DataState(seed=1), quotas, n_windows, 4, 0, 1), 20)  # 10 steps, 2 epochs+
    assert full == rank_samples(RankBatches(DataState(seed=1), quotas, n_windows, 4, 0, 1), 20)
    state = DataState(seed=1)
    for _ in range(3):
        state.advance(quotas)
    resumed = rank_samples(RankBatches(state, quotas, n_windows, 4, 0, 1), 14)
    assert resumed == full[6:]


def test_global_order_is_independent_of_the_number_of_ranks():
    """Per optimizer step, 1 rank with 4 micro-batches and 2 ranks with 2 each see the same windows."""
    quotas, n_windows = batch_quotas([0.7, 0.3], 16), [50, 20]
    one = rank_samples(RankBatches(DataState(seed=9, per_dataset=[0, 0]), quotas, n_windows, 4, 0, 1), 12)
    two = [rank_samples(RankBatches(DataState(seed=9, per_dataset=[0, 0]), quotas, n_windows, 4, r, 2), 6)
           for r in range(2)]  # fmt: skip
    for step in range(3):
        single = sorted(sum(one[step * 4 : step * 4 + 4], []))
        split = sorted(sum(two[0][step * 2 : step * 2 + 2] + two[1][step * 2 : step * 2 + 2], []))
        assert single == split
    counts = np.bincount([d for batch in one[:4] for d, _ in batch])
    assert counts.tolist() == quotas == [11, 5]  # the mixture quota of every global batch


def test_rerun_skips_finished_shards(dataset, tmp_path):
    out = tmp_path / "again"
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(20):
        (src / f"doc{i}.txt").write_text(CODE * (i + 1))
    prepare([src], out, tokenizer=dataset / "tokenizer.model", val_fraction=0.2, shard_mb=0.001, progress=False)
    shard = out / "train-00000.bin"
    before = shard.stat().st_mtime_ns
    prepare([src], out, tokenizer=dataset / "tokenizer.model", val_fraction=0.2, shard_mb=0.001, progress=False)
    assert shard.stat().st_mtime_ns == before


def test_prepare_reads_jsonl_gz_zst_and_parquet(dataset, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = [{"text": f"document {i}: " + CODE} for i in range(30)]
    lines = "".join(json.dumps(d) + "\n" for d in docs)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(lines)
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.write(lines)
    (src / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": [d["text"] for d in docs]}), src / "d.parquet")
    manifest = prepare([src], tmp_path / "out", tokenizer=dataset / "tokenizer.model", val_fraction=0.0,
                       progress=False)  # fmt: skip
    tok = Tokenizer(dataset / "tokenizer.model")
    per_doc = sum(len(tok.encode(d["text"])) + 1 for d in docs)
    assert manifest["tokens"]["train"] == 4 * per_doc


def run_prepare(*args) -> str:
    proc = run_module(["-m", "data.prepare", *args], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    return proc.stderr.strip()


def test_prepare_bad_inputs_are_one_line_errors(tmp_path):
    assert "does not exist" in run_prepare("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    assert "no input files" in run_prepare("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"))
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    err = run_prepare("--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o"), "--vocab-size", "300")
    assert "bad.jsonl" in err and "text" in err
    (tmp_path / "small.txt").write_text("".join(chr(c) for c in range(0x4E00, 0x4F00)))  # 256 characters
    err = run_prepare("--input", str(tmp_path / "small.txt"), "--output", str(tmp_path / "s"), "--vocab-size", "100")
    assert "cannot train a tokenizer of 100 pieces" in err


def copy_dataset(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_shards_are_named(dataset, tmp_path):
    bad = copy_dataset(dataset, tmp_path / "magic")
    shard = bad / "train-00000.bin"
    shard.write_bytes(b"NOTASHRD" + shard.read_bytes()[8:])
    with pytest.raises(DataError, match="train-00000.bin: not a token shard"):
        TokenStream(bad, "train")
    short = copy_dataset(dataset, tmp_path / "short")
    with open(short / "train-00000.bin", "r+b") as f:
        f.truncate(os.path.getsize(short / "train-00000.bin") - 10)
    with pytest.raises(DataError, match="train-00000.bin: file is .* bytes but its header promises"):
        TokenStream(short, "train")


def test_token_ids_beyond_the_vocab_are_named(dataset, tmp_path):
    bad = copy_dataset(dataset, tmp_path / "ids")
    shard = bad / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[HEADER.size : HEADER.size + 2] = (600).to_bytes(2, "little")
    shard.write_bytes(bytes(data))
    loader = train_loader(open_streams([bad], "train", 512, 32), [1.0], DataState(seed=0), 32, 512, 4, 4, 0, 1)
    with pytest.raises(DataError, match="train-00000.bin: token id 600 is >= model.vocab_size 512"):
        for batch, _ in zip(loader, range(10_000)):
            assert batch.max() < 512
    with pytest.raises(DataError, match="tokenizer has 512 tokens but model.vocab_size is 256"):
        open_streams([dataset], "train", 256, 32)


def test_state_dict_round_trip():
    state = DataState(seed=3, samples=40, per_dataset=[30, 10])
    other = DataState(seed=0)
    other.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert other == state
    assert torch.equal(torch.tensor(other.per_dataset), torch.tensor([30, 10]))
