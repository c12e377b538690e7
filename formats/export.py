"""Export a training checkpoint as a Hugging Face model directory (Llama for dense, Mixtral for MoE); the command
is tools/export.py (`python -m tools.export`).

The result loads offline with no custom code: `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`, the tokenizer giving the same ids as ours (BOS added). It holds config.json,
generation_config.json, safetensors weights (sharded with model.safetensors.index.json above --max-shard-size),
tokenizer.model, tokenizer.json and tokenizer_config.json: JSON and safetensors only, no pickles. The weights are
loaded once, already in the export dtype, and written tensor by tensor from that one copy. The directory is written
under a temporary name and renamed when complete; the checkpoint is only read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import SafetensorError
from safetensors.torch import save_file

from data.tokenizer import Tokenizer
from formats.checkpoint import TOKENIZER, CheckpointError, load_model, model_config, read_state, tokenizer_path
from formats.hf import WEIGHTS_INDEX, hf_config, hf_state_dict
from model.config import ModelConfig
from model.llama import Transformer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def check_output(output: Path, checkpoint: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{output}: exists and is not empty (add --overwrite to replace it)")
    out, src = output.resolve(), checkpoint.resolve()
    if out.is_relative_to(src) or src.is_relative_to(out):
        raise ValueError(f"--output {output} must lie outside the checkpoint {checkpoint}")


def check_vocab(cfg: ModelConfig, tokenizer: Tokenizer) -> None:
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size {cfg.vocab_size} is smaller than the {tokenizer.vocab_size} pieces of {tokenizer.path}"
        )


def write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: int | str) -> list[str]:
    """safetensors files of at most `max_shard_size` bytes each, indexed when more than one; returns their names."""
    # Sized per tensor: the expert views share their stacked tensor's storage, which
    # split_torch_state_dict_into_shards would count once.
    split = split_state_dict_into_shards_factory(
        tensors,
        get_storage_size=lambda t: t.numel() * t.element_size(),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    for file, names in split.filename_to_tensors.items():
        save_safetensors({name: tensors[name] for name in names}, out / file)
    if split.is_sharded:
        write_json(out / WEIGHTS_INDEX, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    return list(split.filename_to_tensors)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with its errors (a full disk) as OSErrors naming the file, and the file's mode
    following the umask as every other file's does (save_file writes through a private 0600 temporary file)."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except (OSError, SafetensorError) as e:
        raise OSError(getattr(e, "errno", None), failure_reason(e), str(path)) from None
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def failure_reason(e: Exception) -> str:
    """ "no space left on device" from an OSError or from safetensors' "IoError(Os { ..., message: "..." })"."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    found = re.search(r'message: "([^"]+)"', str(e))
    return found.group(1).lower() if found else str(e)


def write_tokenizer(tokenizer: Tokenizer, out: Path, max_len: int) -> None:
    """tokenizer.model, plus the tokenizer.json (converted by transformers) and tokenizer_config.json that make
    AutoTokenizer encode exactly as our `Tokenizer.encode(text, bos=True)`."""
    from transformers import PreTrainedTokenizerFast  # slow to import: only when exporting

    shutil.copyfile(tokenizer.path, out / TOKENIZER)
    piece = tokenizer.sp.id_to_piece
    settings = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "unk_token": piece(tokenizer.sp.unk_id()),
        "split_special_tokens": True,  # "<s>" typed in a text is text, as sentencepiece reads it
        "legacy": True,  # the dummy prefix "▁" goes before a leading space too, as in sentencepiece
        "clean_up_tokenization_spaces": False,
    }
    native = PreTrainedTokenizerFast.convert_to_native_format(vocab_file=str(out / TOKENIZER), **settings)
    PreTrainedTokenizerFast(**native).backend_tokenizer.save(str(out / "tokenizer.json"))
    # The generic fast class reads tokenizer.json as is; LlamaTokenizer would rebuild it without the legacy prefix.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **settings, "model_max_length": max_len}
    write_json(out / "tokenizer_config.json", config)


def replace_dir(tmp: Path, output: Path) -> None:
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    os.replace(tmp, output)


@contextmanager
def staged_dir(output: Path) -> Iterator[Path]:
    """Where to write the directory `output`: a path inside a temporary staging directory next to it, moved over
    `output` when the block completes. If the block fails (a full disk), the staging directory and everything
    written in it are removed, and an existing `output` is left as it was."""
    staging = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging / output.name
        replace_dir(staging / output.name, output)
    except OSError as e:
        raise OSError(
            f"{e.filename or staging}: {failure_reason(e)}; removed the partial {staging}, nothing older was touched"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_hf(model: Transformer, tokenizer: Tokenizer, output: Path, max_shard_size: int | str = "5GB") -> list[str]:
    """Write `model` (in its own dtype) and `tokenizer` as the Hugging Face directory `output`, replacing it if it
    exists; returns the names of the weight files."""
    cfg = model.cfg
    check_vocab(cfg, tokenizer)
    with staged_dir(output) as tmp:
        tmp.mkdir()
        files = write_weights(hf_state_dict(cfg, model.state_dict()), tmp, max_shard_size)
        dtype = model.lm_head.weight.dtype
        write_json(tmp / "config.json", hf_config(cfg, dtype, tokenizer.bos_id, tokenizer.eos_id))
        write_json(tmp / "generation_config.json", {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})
        write_tokenizer(tokenizer, tmp, cfg.max_seq_len)
    return files


def export(
    checkpoint: str | Path,
    output: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> list[str]:
    """Checkpoint directory -> Hugging Face directory; returns the names of the weight files written."""
    checkpoint, output = Path(checkpoint), Path(output)
    check_output(output, checkpoint, overwrite)
    cfg = model_config(read_state(checkpoint))
    sp_model = tokenizer_path(checkpoint)
    if sp_model is None:
        raise CheckpointError(f"{checkpoint}: checkpoint has no {TOKENIZER}")
    tokenizer = Tokenizer(sp_model)
    check_vocab(cfg, tokenizer)  # before the weights are read
    model, _ = load_model(checkpoint, dtype=dtype)  # only the "model" entries: no optimizer state
    return save_hf(model, tokenizer, output, max_shard_size)
