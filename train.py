"""Pretrain a TinyLlama-style decoder (dense, or a Mixtral-style mixture of experts) with Lightning Fabric + FSDP2.

python train.py                                        # configs/tiny.yaml on the stdlib corpus, one process
python train.py --config configs/NAME.yaml --optim.lr 3e-4 --devices 2
torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT train.py --config ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.fabric import Fabric
from torch.distributed.checkpoint.api import CheckpointException
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.corpus import default_corpus
from data.shards import TOKENIZER_FILE, DataError, read_manifest
from data.stream import DataState, open_streams, train_loader
from data.tokenizer import TextBytes, Tokenizer, file_sha256
from formats.checkpoint import CheckpointError, tokenizer_path
from model.config import flops_per_token
from model.sampling import generate, model_step
from training.checkpoint import Checkpointer, load_training_state, resume_path
from training.config import TrainConfig, parse_config
from training.guard import SpikeGuard
from training.lock import out_dir_lock
from training.loop import Progress, StopOnSignal, evaluate, skip_or_stop, train_step
from training.memory import check_memory
from training.metrics import MetricsLogger, Throughput, device_peak_flops
from training.optim import lr_at, make_optimizer, set_lr
from training.setup import (
    TrainingError,
    build_model,
    check_attention,
    check_init_from,
    init_from_tokenizer,
    launch,
    local_ranks,
)

USER_ERRORS = (ArgumentError, ValueError, FileNotFoundError, TrainingError, DataError, CheckpointError)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_config(argv)
        train(cfg)
    except USER_ERRORS as e:
        print(f"error: {str(e).strip()}".replace("\n", " "), file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, CheckpointException) as e:  # a second Ctrl-C, maybe inside a save
        if not interrupted(e):
            raise
        print("error: interrupted; the checkpoints already saved are intact", file=sys.stderr)
        sys.exit(130)


def interrupted(e: BaseException) -> bool:
    """A Ctrl-C, also when torch.distributed.checkpoint caught it in a save and wrapped it per rank."""
    if isinstance(e, CheckpointException):
        return any(isinstance(failure, KeyboardInterrupt) for failure, _ in e.failures.values())
    return isinstance(e, KeyboardInterrupt)


def train(cfg: TrainConfig) -> None:
    check_init_from(cfg)
    fabric = launch(cfg)
    out_dir = cfg.resolved_out_dir()
    with out_dir_lock(out_dir, fabric):  # before anything is written into out_dir
        run(cfg, fabric, out_dir)


def run(cfg: TrainConfig, fabric: Fabric, out_dir: Path) -> None:
    datasets = resolve_datasets(cfg, fabric)
    tokenizer = datasets_tokenizer(datasets)
    start_from = resume_path(cfg.resume, out_dir)
    resumed_tokenizer = tokenizer_path(start_from) if start_from is not None else None  # checksum-verified once
    if resumed_tokenizer is not None:
        check_same_tokenizer(datasets, resumed_tokenizer, "the checkpoint resumed")
    check_attention(cfg, fabric.device)
    check_planned_memory(cfg, fabric)

    model = fabric.setup_module(build_model(cfg))  # built on the meta device; each rank fills only its shards
    optimizer = fabric.setup_optimizers(make_optimizer(model, cfg.optim, fabric.device))
    guard = SpikeGuard(cfg.optim.spike_sigmas, cfg.optim.spike_window)
    progress = Progress(DataState(cfg.seed, per_dataset=[0] * len(datasets)), guard)
    if start_from is not None:
        progress.load_state_dict(load_training_state(start_from, cfg.model, model, optimizer, cfg.optim.name))
        fabric.print(f"resumed from {start_from} at step {progress.step}")

    accum = cfg.grad_accumulation(fabric.world_size)
    weights = list(datasets.values())
    val_streams = open_streams(list(datasets), "val", cfg.model.vocab_size, cfg.seq_len) if cfg.eval_every else []
    text_bytes = TextBytes(Tokenizer(tokenizer)).to(fabric.device) if tokenizer is not None else None
    if cfg.eval_every and text_bytes is None:
        fabric.print(f"{next(iter(datasets))} has no {TOKENIZER_FILE}: val_bpb is not logged")
    loader = rank_loader(cfg, datasets, progress.data, fabric)
    batches, quotas = iter(loader), loader.batch_sampler.quotas
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    peak = device_peak_flops(fabric.device)
    meter = Throughput(tokens_per_step, flops_per_token(cfg.model, cfg.seq_len), peak and peak * fabric.world_size)

    rank0 = fabric.global_rank == 0
    logger = MetricsLogger(out_dir, rank0, progress.step)
    checkpointer = Checkpointer(out_dir, cfg.keep_last, cfg.async_save, fabric.global_rank, tokenizer)
    stop = StopOnSignal()
    fabric.print(
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {fabric.world_size} process(es), "
        f"{accum} micro-batch(es) of {cfg.micro_batch_size} x {cfg.seq_len} per rank and step"
    )

    def save() -> None:
        state = {**progress.state_dict(), "config": cfg.to_dict(), "world_size": fabric.world_size}
        started = time.perf_counter()
        checkpointer.save(progress.step, model, optimizer, state)
        # how long training waited: the whole write, or with async_save the copy to host memory
        logger.log(progress.step, {"checkpoint_save_s": time.perf_counter() - started})

    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="train", disable=not rank0, dynamic_ncols=True)
    try:
        if progress.step == 0 and cfg.eval_every:
            logger.log(0, evaluate(fabric, model, val_streams, weights, cfg, text_bytes))
        while progress.step < cfg.max_steps:
            lr = set_lr(optimizer, lr_at(progress.step, cfg.optim, cfg.max_steps), cfg.optim)
            started = time.perf_counter()
            result = train_step(
                fabric,
                model,
                optimizer,
                batches,
                accum,
                cfg.optim.grad_clip,
                stop.requested,
                cfg.grad_sync_every_micro_batch,
                guard,
            )
            meter.add(time.perf_counter() - started)
            progress.advance(tokens_per_step, quotas)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}")
            checkpointer.poll()

            finished = progress.step == cfg.max_steps
            if progress.step % cfg.log_every == 0 or finished or result.skipped:
                step_metrics = {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": progress.tokens}
                step_metrics["skipped_steps"] = guard.skipped
                logger.log(progress.step, {**step_metrics, **meter.read(), **result.metrics})
            if result.skipped:
                skip_or_stop(progress, result, cfg.optim.max_skipped_steps, fabric)
            if cfg.eval_every and (progress.step % cfg.eval_every == 0 or finished):
                val = evaluate(fabric, model, val_streams, weights, cfg, text_bytes)
                logger.log(progress.step, val)
                if rank0:
                    bpb = f", {val['val_bpb']:.4f} bits per byte" if "val_bpb" in val else ""
                    bar.write(f"step {progress.step}: val loss {val['val_loss']:.4f}{bpb}")
            if result.stop_requested or finished or (cfg.save_every and progress.step % cfg.save_every == 0):
                save()
            if result.stop_requested:
                fabric.print(f"{stop.received or 'stop signal'}: saved a checkpoint at step {progress.step}; exiting")
                break
    finally:
        bar.close()
        checkpointer.wait()
        logger.close()
        stop.restore()

    if cfg.sample_prompt and tokenizer is not None and not stop.requested:
        fabric.print(f"sample: {sample(model, tokenizer, cfg, fabric)!r}")


def check_planned_memory(cfg: TrainConfig, fabric: Fabric) -> None:
    """Print the run's memory plan; stop every rank, before anything is allocated, when rank 0 finds it does not fit
    (rank 0 alone plans and decides: the free memory each rank reads differs a little)."""
    refusal = None
    if fabric.global_rank == 0:
        try:
            print(check_memory(cfg, fabric.world_size, local_ranks(cfg), fabric.device).summary())
        except TrainingError as e:
            refusal = str(e)
    refusal = fabric.broadcast(refusal)
    if refusal is not None:
        raise TrainingError(refusal)


def resolve_datasets(cfg: TrainConfig, fabric: Fabric) -> dict[str, float]:
    """{dataset dir: weight}; with no data configured, the stdlib corpus (prepared by rank 0 if missing) in the
    tokenizer of the `init_from` model if there is one. The data must be in the initial model's tokenizer."""
    start_tokenizer = init_from_tokenizer(cfg)
    if cfg.datasets is not None:
        datasets = cfg.datasets
    else:
        if fabric.global_rank == 0:
            default_corpus(cfg.model.vocab_size, start_tokenizer)
        fabric.barrier()
        datasets = {str(default_corpus(cfg.model.vocab_size, start_tokenizer, progress=False)): 1.0}
    if start_tokenizer is not None:
        check_same_tokenizer(datasets, start_tokenizer, "init_from")
    return datasets


def check_same_tokenizer(datasets: dict[str, float], tokenizer: Path, owner: str) -> None:
    """Every dataset was prepared with `tokenizer`, the one of `owner` (the model training starts from)."""
    expected = file_sha256(tokenizer)
    for path in datasets:
        if read_manifest(Path(path))["tokenizer"]["sha256"] != expected:
            raise DataError(f"{path}: prepared with another tokenizer than {tokenizer} of {owner}")


def rank_loader(cfg: TrainConfig, datasets: dict[str, float], state: DataState, fabric: Fabric) -> DataLoader:
    """This rank's micro-batches, continuing the global data order from `state`."""
    streams = open_streams(list(datasets), "train", cfg.model.vocab_size, cfg.seq_len)
    return train_loader(
        streams,
        list(datasets.values()),
        state,
        seq_len=cfg.seq_len,
        vocab_size=cfg.model.vocab_size,
        global_batch_size=cfg.global_batch_size,
        micro_batch=cfg.micro_batch_size,
        rank=fabric.global_rank,
        world=fabric.world_size,
        workers=cfg.data_workers,
        pin_memory=fabric.device.type == "cuda",
    )


def datasets_tokenizer(datasets: dict[str, float]) -> Path | None:
    first = Path(next(iter(datasets)))
    path = first / read_manifest(first)["tokenizer"]["file"]
    return path if path.is_file() else None


def sample(model: torch.nn.Module, tokenizer_path: Path, cfg: TrainConfig, fabric: Fabric) -> str:
    """A short continuation of `sample_prompt` (every rank decodes in lockstep: the model is sharded)."""
    tok = Tokenizer(tokenizer_path)
    prompt = torch.tensor([tok.encode(cfg.sample_prompt, bos=True)], device=fabric.device)
    max_len = min(cfg.model.max_seq_len, prompt.shape[1] + cfg.sample_tokens)
    step = model_step(model, 1, max_len)
    out = generate(step, prompt, max_len - prompt.shape[1], temperature=0.8, top_k=50, seed=cfg.seed)
    return tok.decode(out[0, prompt.shape[1] :].tolist())


if __name__ == "__main__":
    main()
