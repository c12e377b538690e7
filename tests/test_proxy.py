"""Proxy-tuning at decoding time: logits = base + alpha x (expert - anti_expert), over models of other sizes and
kinds (a mixture-of-experts base steered by a dense pair)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.sources import read_documents, stdlib_files
from data.tokenizer import train_tokenizer
from formats.checkpoint import TOKENIZER, checkpoint_name, write_checksums
from model.sampling import generate as decode
from model.sampling import no_cache_step
from tests.conftest import run_module, run_train
from tools import generate, perplexity
from tools.proxy import Scorer, load_scorer, proxy_logits

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ALPHA = 0.7


def train_checkpoint(out_dir: Path, dataset: Path, steps: int, *extra: str) -> Path:
    run_train([f"--data={dataset}", f"--out_dir={out_dir}", f"--max_steps={steps}", "--eval_every=0", *extra])
    return out_dir / "checkpoints" / checkpoint_name(steps)


@pytest.fixture(scope="module")
def trio(dataset, tmp_path_factory) -> dict[str, Path]:
    """A 3-layer MoE base, a 2-layer dense anti-expert, and the expert: the anti-expert tuned further."""
    root = tmp_path_factory.mktemp("proxy")
    moe = ["--model.n_layers=3", "--model.num_experts=4", "--model.top_k=2"]
    base = train_checkpoint(root / "base", dataset, 8, *moe)
    anti = train_checkpoint(root / "anti", dataset, 8, "--seed=2")
    expert = train_checkpoint(root / "expert", dataset, 4, "--seed=3", f"--init_from={anti}")
    return {"base": base, "expert": expert, "anti": anti}


def proxy_args(trio: dict[str, Path], alpha: float = ALPHA) -> list[str]:
    return ["--checkpoint", str(trio["base"]), "--expert", str(trio["expert"]), "--anti-expert", str(trio["anti"]),
            "--alpha", str(alpha)]  # fmt: skip


def scorer_of(trio: dict[str, Path], alpha: float = ALPHA) -> Scorer:
    args = argparse.Namespace(
        checkpoint=trio["base"],
        expert=trio["expert"],
        anti_expert=trio["anti"],
        alpha=alpha,
        device="cpu",
        dtype="fp32",
    )
    return load_scorer(args)


def printed_json(capsys, main, argv: list[str]) -> dict:
    capsys.readouterr()
    main(argv)
    return json.loads(capsys.readouterr().out)


def test_combined_logits_are_the_direct_computation(trio, dataset, capsys):
    scorer = scorer_of(trio)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base, expert, anti = (m(tokens).logits for m in (scorer.base, scorer.expert, scorer.anti))
    assert base.shape == expert.shape == anti.shape == (2, 24, 512)
    torch.testing.assert_close(scorer.logits(tokens), base + ALPHA * (expert - anti), rtol=0, atol=1e-5)

    # tools.perplexity's proxy loss is the cross-entropy of those logits over the scored windows
    windows = ["--data", str(dataset), "--max-windows", "6"]
    reported = printed_json(capsys, perplexity.main, [*proxy_args(trio), *windows])
    total, count = 0.0, 0
    for inputs, targets in perplexity.dataset_batches(dataset, "val", scorer.tokenizer, 64, 512, max_windows=6):
        with torch.no_grad():
            logits = proxy_logits(*(m(inputs).logits for m in scorer.models), ALPHA)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += int((targets != -100).sum())
    assert reported["tokens"] == count
    assert reported["loss"] == pytest.approx(total / count, rel=1e-6)


def test_alpha_zero_is_the_base_model(trio, dataset, capsys):
    windows = ["--data", str(dataset), "--max-windows", "6"]
    alone = printed_json(capsys, perplexity.main, ["--checkpoint", str(trio["base"]), *windows])
    assert printed_json(capsys, perplexity.main, [*proxy_args(trio, 0.0), *windows]) == alone

    greedy = ["--prompt", "def parse(", "--temperature", "0", "--max-new-tokens", "20", "--json"]
    alone = printed_json(capsys, generate.main, ["--checkpoint", str(trio["base"]), *greedy])
    assert printed_json(capsys, generate.main, [*proxy_args(trio, 0.0), *greedy]) == alone
    assert printed_json(capsys, generate.main, [*proxy_args(trio, 1.0), *greedy]) != alone  # the expert steers


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_kv_cached_proxy_decoding_equals_uncached(trio, temperature):
    scorer = scorer_of(trio)
    prompt = torch.tensor([scorer.tokenizer.encode("class Message:\n    def ", bos=True)])
    new = scorer.max_seq_len - prompt.shape[1]
    uncached_steps = [no_cache_step(m) for m in scorer.models]
    uncached = lambda tokens, start: proxy_logits(*(s(tokens, start) for s in uncached_steps), scorer.alpha)
    cached = decode(scorer.step(1, scorer.max_seq_len), prompt, new, temperature, seed=5)
    assert cached.shape[1] == scorer.max_seq_len
    assert torch.equal(cached, decode(uncached, prompt, new, temperature, seed=5))


def test_tokenizer_mismatch_is_a_clear_error(trio, dataset, tmp_path):
    stranger = tmp_path / "stranger"
    shutil.copytree(trio["anti"], stranger)
    docs = (doc for path in stdlib_files(packages=["json"]) for doc in read_documents(path))
    train_tokenizer(docs, 512, stranger / TOKENIZER)
    write_checksums(stranger)  # another tokenizer, not a damaged file
    argv = ["--checkpoint", str(trio["base"]), "--expert", str(trio["expert"]), "--anti-expert", str(stranger)]
    proc = run_module(["-m", "tools.perplexity", *argv, "--data", str(dataset)], check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {stranger}: tokenizer differs"), proc.stderr
