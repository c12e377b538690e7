"""Hugging Face interoperability: export to Llama / Mixtral and import back, checked against transformers itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from data.prepare import prepare
from data.sources import stdlib_files
from data.tokenizer import Tokenizer
from formats import export
from formats.checkpoint import STATE_FILE, TOKENIZER, checkpoint_name, load_model, write_checksums
from formats.hf import WEIGHTS_INDEX, check_config, config_from_hf, load_hf_weights
from model.llama import Transformer
from model.sampling import generate, model_step
from tests.conftest import TINY_ARGS, read_metrics, run_module, run_train, tiny_config
from tools import export as export_tool
from tools import perplexity

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 4
TEXTS = [
    "def f(x):\n\tif x:\n        return 'ünïcode ✓ 123'\n\n\nclass A:  # trailing  \n    pass\n",
    " leading space",
    "   three leading, two  inner,  trailing  ",
    "\n\nnewlines first\r\nand CRLF",
    "日本語 🙂 emoji, <s> and </s> typed as text",
    "",
    " ",
]


def train_checkpoint(out_dir: Path, dataset: Path, *extra: str) -> Path:
    run_train([f"--data={dataset}", f"--out_dir={out_dir}", f"--max_steps={STEPS}", f"--eval_every={STEPS}", *extra])
    return out_dir / "checkpoints" / checkpoint_name(STEPS)


@pytest.fixture(scope="module")
def dense(dataset, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint written by 2 processes, its fp32 export by the command line tool)."""
    root = tmp_path_factory.mktemp("dense")
    ckpt = train_checkpoint(root / "run", dataset, "--devices=2")
    run_module(["-m", "tools.export", f"--checkpoint={ckpt}", f"--output={root / 'hf'}", "--dtype=fp32"])
    return ckpt, root / "hf"


@pytest.fixture(scope="module")
def moe(dataset, tmp_path_factory) -> tuple[Path, Path]:
    """(MoE checkpoint, its fp32 export)."""
    root = tmp_path_factory.mktemp("moe")
    ckpt = train_checkpoint(root / "run", dataset, "--model.num_experts=4", "--model.top_k=2")
    export.export(ckpt, root / "hf", torch.float32)
    return ckpt, root / "hf"


def hf_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            weights.update({name: f.get_tensor(name) for name in f.keys()})
    return weights


def assert_same_as_transformers(ours: Transformer, hf_dir: Path, tokenizer: Tokenizer) -> None:
    """Logits to 1e-4 in fp32, and the same greedy continuation, from transformers' own model class."""
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(theirs).__name__ == ("MixtralForCausalLM" if ours.cfg.is_moe else "LlamaForCausalLM")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, ours.cfg.max_seq_len), generator=generator)
    with torch.no_grad():
        diff = (ours(tokens).logits - theirs(tokens).logits).abs().max().item()
    assert diff <= 1e-4
    prompt = torch.tensor([tokenizer.encode("def parse(self, fp):\n    ", bos=True)])
    ours_greedy = generate(model_step(ours, 1, ours.cfg.max_seq_len), prompt, 24, eos_id=tokenizer.eos_id)
    assert torch.equal(ours_greedy, theirs.generate(prompt, do_sample=False, max_new_tokens=24))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_export_matches_transformers(kind, request):
    ckpt, hf_dir = request.getfixturevalue(kind)
    assert_same_as_transformers(load_model(ckpt)[0], hf_dir, Tokenizer(ckpt / TOKENIZER))
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (10000.0, 1e-5, 64)
    if kind == "moe":  # the per-expert layout of save_pretrained, which transformers fuses on load
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in hf_weights(hf_dir)
        assert config["num_local_experts"] == 4 and config["router_jitter_noise"] == 0.0


def test_perplexity_of_the_export_in_transformers_equals_the_checkpoints(dense, tmp_path, capsys):
    ckpt, hf_dir = dense
    text = tmp_path / "text.py"
    text.write_text("".join(TEXTS) * 3)
    losses = []
    for flags in ([f"--checkpoint={ckpt}"], [f"--checkpoint={hf_dir}", "--transformers"]):
        perplexity.main([*flags, f"--text-file={text}"])
        losses.append(json.loads(capsys.readouterr().out))
    assert losses[0]["tokens"] == losses[1]["tokens"] > 0
    assert losses[1]["loss"] == pytest.approx(losses[0]["loss"], abs=1e-4)


def test_tied_embeddings_export(dense, tmp_path):
    ckpt, _ = dense
    model = Transformer(tiny_config(tie_embeddings=True)).eval()
    tokenizer = Tokenizer(ckpt / TOKENIZER)
    export.save_hf(model, tokenizer, tmp_path / "hf")
    assert "lm_head.weight" not in hf_weights(tmp_path / "hf")
    assert_same_as_transformers(model, tmp_path / "hf", tokenizer)


def test_tokenizer_gives_our_ids(dense):
    ckpt, hf_dir = dense
    ours, theirs = Tokenizer(ckpt / TOKENIZER), AutoTokenizer.from_pretrained(hf_dir)
    code = stdlib_files(packages=["email"])[0].read_text()[:20000]
    for text in [*TEXTS, code]:
        ids = ours.encode(text, bos=True)
        assert theirs(text)["input_ids"] == ids, text[:40]
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_import_then_export_is_the_identity(kind, request, tmp_path):
    ckpt, hf_dir = request.getfixturevalue(kind)
    model = Transformer(config_from_hf(hf_dir))
    load_hf_weights(model, hf_dir)
    export.save_hf(model, Tokenizer(hf_dir / TOKENIZER), tmp_path / "again")
    before, after = hf_weights(hf_dir), hf_weights(tmp_path / "again")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (hf_dir / file).read_text() == (tmp_path / "again" / file).read_text()


def test_sharded_export_is_indexed_and_loads(dense, tmp_path):
    ckpt, _ = dense
    files = export.export(ckpt, tmp_path / "hf", torch.float32, max_shard_size="200KB")
    index = json.loads((tmp_path / "hf" / WEIGHTS_INDEX).read_text())
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == sorted(files)
    assert all((tmp_path / "hf" / f).stat().st_size <= 200_000 + 10_000 for f in files)  # + the header
    ours = load_model(ckpt)[0]
    imported = Transformer(ours.cfg)
    load_hf_weights(imported, tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), imported.state_dict().values()))
    assert_same_as_transformers(ours, tmp_path / "hf", Tokenizer(ckpt / TOKENIZER))


def test_bf16_export_is_the_rounded_checkpoint(dense, tmp_path):
    ckpt, hf_dir = dense
    export.export(ckpt, tmp_path / "hf")
    exported, full = hf_weights(tmp_path / "hf"), hf_weights(hf_dir)
    assert all(exported[name].dtype == torch.bfloat16 for name in exported)
    assert all(torch.equal(exported[name], full[name].bfloat16()) for name in full)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_init_from_hf_trains_and_its_tokenizer_prepares_data(dense, dataset, tmp_path):
    ckpt, hf_dir = dense
    prepared = prepare([stdlib_files(packages=["json"])[0]], tmp_path / "data", tokenizer=hf_dir, progress=False)
    assert prepared["tokenizer"]["sha256"] == Tokenizer(ckpt / TOKENIZER).sha256
    init = [f"--init_from={hf_dir}", "--max_steps=2", "--eval_every=2", "--devices=2"]
    run_train([f"--data={dataset}", f"--out_dir={tmp_path}", *init])
    # Before its first step, the run evaluates the exported weights (each of the 2 ranks read its shards of them):
    # the source run's final validation loss.
    source_val = [r["val_loss"] for r in read_metrics(ckpt.parent.parent) if "val_loss" in r][-1]
    first_val = [r for r in read_metrics(tmp_path) if "val_loss" in r][0]
    assert first_val["step"] == 0 and first_val["val_loss"] == pytest.approx(source_val, abs=1e-4)


def test_init_from_must_match_the_hf_config(dense):
    _, hf_dir = dense
    with pytest.raises(ValueError, match=r"model.dim 128 != hidden_size 64 in .*config.json"):
        check_config(tiny_config(dim=128), hf_dir)
    with pytest.raises(ValueError, match="model.num_experts 4 != num_local_experts 0"):
        check_config(tiny_config(num_experts=4), hf_dir)


def write_gpt2(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2}))
    return path


def test_unsupported_hf_architecture_is_a_one_line_error(dataset, tmp_path, capsys):
    gpt2 = write_gpt2(tmp_path / "gpt2")
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY_ARGS, f"--data={dataset}", f"--out_dir={tmp_path / 'run'}", f"--init_from={gpt2}"])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and err.count("\n") == 1
    assert err.startswith("error: ") and "model_type 'gpt2' is not supported" in err
    with pytest.raises(ValueError, match="no tokenizer.model"):
        prepare([stdlib_files(packages=["json"])[0]], tmp_path / "data", tokenizer=gpt2, progress=False)


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def copy_checkpoint(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "ckpt"))


def remove_marker(ckpt: Path) -> None:
    (ckpt / "COMPLETE").unlink()


def truncate_shard(ckpt: Path) -> None:
    shard = ckpt / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])


def shrink_vocab(ckpt: Path) -> None:
    state = json.loads((ckpt / STATE_FILE).read_text())
    state["config"]["model"]["vocab_size"] = 256
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    write_checksums(ckpt)  # a consistent checkpoint of that shape, not a damaged one


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (remove_marker, "not a complete checkpoint"),
        (truncate_shard, "damaged checkpoint"),
        (shrink_vocab, "model.vocab_size 256 is smaller than the 512 pieces"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(dense, tmp_path, damage, message):
    ckpt = copy_checkpoint(dense[0], tmp_path)
    damage(ckpt)
    before = snapshot(ckpt)
    with pytest.raises(SystemExit) as exit_info:
        export_tool.main([f"--checkpoint={ckpt}", f"--output={tmp_path / 'hf'}"])
    assert str(exit_info.value.code).startswith("error: ") and "\n" not in exit_info.value.code
    assert message in exit_info.value.code
    assert snapshot(ckpt) == before and not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_existing_output_is_kept_unless_overwrite(dense, tmp_path):
    ckpt, _ = dense
    source = snapshot(ckpt)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    proc = run_module(["-m", "tools.export", f"--checkpoint={ckpt}", f"--output={tmp_path / 'hf'}"], check=False)
    assert proc.returncode != 0 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "exists and is not empty" in proc.stderr and (tmp_path / "hf" / "mine.txt").read_text() == "keep me"
    export_tool.main([f"--checkpoint={ckpt}", f"--output={tmp_path / 'hf'}", "--overwrite"])
    assert not (tmp_path / "hf" / "mine.txt").exists() and (tmp_path / "hf" / "model.safetensors").is_file()
    assert snapshot(ckpt) == source
    with pytest.raises(SystemExit, match="must lie outside the checkpoint"):
        export_tool.main([f"--checkpoint={ckpt}", f"--output={ckpt / 'hf'}"])
