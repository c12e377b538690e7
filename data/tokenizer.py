"""SentencePiece tokenizer: train a Llama-style BPE model, or load an existing `tokenizer.model`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
import torch

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
IGNORE_INDEX = -100  # a target that is not scored (model.loss's)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A sentencepiece model with its checksum: shards and checkpoints name the tokenizer they were made with."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.sha256 = file_sha256(self.path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class TextBytes:
    """The UTF-8 bytes of text that scored tokens stand for: a loss in nats per token times tokens / bytes / ln 2
    is in bits per byte, which compares across tokenizers.

    A token stands for the bytes it adds to the decoded text: its piece's UTF-8 size with ▁ as a space, 1 for a
    byte-fallback piece, 0 for BOS, EOS and unknown. sentencepiece encodes a text with a space in front (its dummy
    prefix), which decoding drops, so a document's first token (after BOS or EOS) stands for one byte less. For a
    tokenizer that decodes to its input (identity normalisation, whitespace kept: ours and Llama 2's) a
    document's tokens add up to the document's UTF-8 size, and any stretch of tokens to the text it encodes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        sp = tokenizer.sp
        self.per_token_V = torch.tensor([_piece_bytes(sp, i) for i in range(sp.get_piece_size())])
        self.doc_starts_after = torch.tensor([i for i in (sp.bos_id(), sp.eos_id()) if i >= 0])
        self.dummy_prefix = int(sp.encode("a", out_type=str)[0].startswith("▁"))

    def to(self, device: torch.device) -> TextBytes:
        self.per_token_V, self.doc_starts_after = self.per_token_V.to(device), self.doc_starts_after.to(device)
        return self

    def count(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """Bytes of the text of the scored targets (those not -100), given the tokens before them (`inputs`)."""
        per_target_BT = self.per_token_V[targets_BT.clamp(min=0)]
        first_of_document_BT = torch.isin(inputs_BT, self.doc_starts_after)
        per_target_BT = (per_target_BT - self.dummy_prefix * first_of_document_BT.long()).clamp(min=0)
        return (per_target_BT * (targets_BT != IGNORE_INDEX)).sum()


def _piece_bytes(sp: spm.SentencePieceProcessor, i: int) -> int:
    if sp.is_control(i) or sp.is_unknown(i):
        return 0
    if sp.is_byte(i):
        return 1
    return len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))


def _lines(documents: Iterable[str], max_lines: int) -> Iterator[str]:
    """sentencepiece trains on 'sentences'; for code and prose a line is the natural unit."""
    n = 0
    for doc in documents:
        for line in doc.splitlines():
            if line.strip():
                yield line
                n += 1
                if n >= max_lines:
                    return


def train_tokenizer(documents: Iterable[str], vocab_size: int, output: Path, max_lines: int = 400_000) -> Tokenizer:
    """Train a BPE model like Llama's (byte fallback, unk=0 bos=1 eos=2, digits split, whitespace kept as is)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    prefix = output.parent / f".{output.stem}.tmp"  # renamed into place only once training has finished
    reading_errors: list[Exception] = []
    try:
        _train_bpe(_recording_errors(_lines(documents, max_lines), reading_errors), vocab_size, prefix, max_lines)
    except RuntimeError as e:
        if reading_errors:  # sentencepiece wraps an input file's error in its own message: give the original
            raise reading_errors[0] from None
        raise ValueError(f"cannot train a tokenizer of {vocab_size} pieces: {_trainer_reason(e)}") from None
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    Path(f"{prefix}.model").replace(output)
    return Tokenizer(output)


def _recording_errors(lines: Iterator[str], errors: list[Exception]) -> Iterator[str]:
    try:
        yield from lines
    except Exception as e:
        errors.append(e)
        raise


def _trainer_reason(e: RuntimeError) -> str:
    """sentencepiece's message without its source location, e.g. "Vocabulary size too high (512). ..."."""
    message = str(e).strip()
    if "sentences_.empty()" in message:
        return "the input holds no text"
    return message.split("] ")[-1].strip() or message


def _train_bpe(documents: Iterable[str], vocab_size: int, prefix: Path, max_lines: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(documents, max_lines),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        max_sentence_length=1 << 14,
        num_threads=2,
        minloglevel=2,
    )
