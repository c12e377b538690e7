"""The training configuration: plain dataclasses, read from YAML and overridden by dotted command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from formats.checkpoint import check_same_shape, complete_checkpoints, model_config, read_state
from model.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"
RENAMED_KEYS = {"skip_nan_batches": "optim.max_skipped_steps"}  # keys of earlier versions, named in their error


@dataclass
class OptimConfig:
    """The optimizer (training/optim.py) and its learning-rate schedule (which counts optimizer steps), the
    regularisers of the training objective and the guard against loss spikes (training/guard.py)."""

    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon on the hidden matrices, AdamW on the rest
    lr: float = 4e-4  # AdamW's peak learning rate
    min_lr: float = 4e-5  # where the decay ends
    warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # AdamW's, and Muon's (decoupled in both)
    grad_clip: float = 1.0
    muon_lr: float | None = None  # Muon's peak learning rate (default: lr; the update is scaled to AdamW's RMS)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warm-up, constant lr, then a decay over the last steps
    decay_fraction: float = 0.2  # wsd: the fraction of max_steps that decays, in (0, 1]
    decay_steps: int | None = None  # wsd: decay over exactly this many final steps instead (a decay branch's length)
    decay_shape: Literal["linear", "1-sqrt"] = "linear"  # wsd: lr falls as 1 - progress, or 1 - sqrt(progress)

    # Output z-loss (PaLM): this coefficient x the mean over tokens of log²Z, Z the partition function of the output
    # softmax (PaLM used 1e-4, OLMo 2 1e-5; 0: off). Not the MoE router's z-loss, model.z_loss_coef.
    output_z_loss_coef: float = 0.0
    # Loss-spike guard (training/guard.py): an update whose loss or gradient norm is above the mean + spike_sigmas
    # standard deviations of the last spike_window accepted steps is skipped on every rank (null: only non-finite
    # ones are); the run stops once more than max_skipped_steps updates were skipped.
    spike_sigmas: float | None = 6.0
    spike_window: int = 128
    max_skipped_steps: int = 10

    def validate(self) -> None:
        """Raise ValueError naming the offending key."""
        for key in ("lr", "muon_lr"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"optim.{key} must be positive, got {getattr(self, key)}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ValueError(f"optim.decay_steps must be positive, got {self.decay_steps}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.muon_ns_steps <= 0:
            raise ValueError(f"optim.muon_ns_steps must be positive, got {self.muon_ns_steps}")
        if self.spike_sigmas is not None and not self.spike_sigmas > 0:
            raise ValueError(f"optim.spike_sigmas must be positive (or null: no spike guard), got {self.spike_sigmas}")
        if self.spike_window < 2:
            raise ValueError(f"optim.spike_window must be at least 2 (a standard deviation), got {self.spike_window}")
        for key in ("max_skipped_steps", "output_z_loss_coef"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"optim.{key} must be 0 or positive, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str | None = None  # default runs/<config name>
    data: str | dict[str, float] | None = None  # a prepared dataset dir, {dir: weight, ...}, or None: the stdlib
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 8  # sequences per optimizer step, over all ranks
    max_steps: int = 1000
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation
    eval_windows: int = 160  # validation sequences per dataset (the same ones for any number of ranks)
    save_every: int = 500  # 0 saves only at the end
    keep_last: int = 3  # complete checkpoints kept (0 keeps all)
    async_save: bool = False
    resume: str = "auto"  # auto (newest checkpoint in out_dir, if any) | none | PATH
    init_from: str | None = None  # initial weights: a Hugging Face Llama/Mixtral directory or a checkpoint
    # A decay branch: continue this checkpoint's wsd run (its config, data order, optimizer state and step count)
    # in a new out_dir for optim.decay_steps more steps (default: the run's own decay length), decaying to min_lr.
    branch_from: str | None = None
    devices: int = 1  # processes per node
    num_nodes: int = 1
    dist_timeout: int = 1800  # seconds to wait for the other processes (rendezvous, collectives)
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "bf16-true"] = "32-true"
    activation_checkpointing: Literal["none", "full"] = "none"
    compile: bool = False
    # Hybrid sharding: shard within groups of world/fsdp_replicas ranks (set it to the node count for one group per
    # node), replicate across them; 1 shards over every rank.
    fsdp_replicas: int = 1
    # Reduce-scatter gradients after every micro-batch: more communication, but gradients stay sharded instead of
    # FSDP2 keeping a full unsharded fp32 accumulator per rank between micro-batches.
    grad_sync_every_micro_batch: bool = False
    cpu_kernels: bool = True  # on a CPU, swap in the tested-equal fast paths of cpu_kernels/ (false: the reference)
    # Before building the model, stop when the memory plan (training/memory.py) exceeds the device's free memory.
    memory_check: bool = True
    data_workers: int = 0
    threads: int | None = None  # torch intra-op threads per process (default: torch's choice)
    sample_prompt: str = "def "  # generated from at the end of training ("" to skip)
    sample_tokens: int = 48
    config_name: str = "tiny"  # set from the --config file name

    @property
    def datasets(self) -> dict[str, float] | None:
        if self.data is None:
            return None
        return {self.data: 1.0} if isinstance(self.data, str) else dict(self.data)

    def validate(self) -> None:
        positive = ["seq_len", "micro_batch_size", "global_batch_size", "max_steps", "log_every", "devices"]
        positive += ["num_nodes", "fsdp_replicas"] + (["eval_windows"] if self.eval_every else [])  # eval only
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("eval_every", "save_every", "keep_last", "data_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be 0 or positive, got {getattr(self, key)}")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        if self.datasets is not None and any(w <= 0 for w in self.datasets.values()):
            raise ValueError(f"data weights must be positive, got {self.datasets}")
        self.optim.validate()

    def grad_accumulation(self, world_size: int) -> int:
        """Micro-steps per optimizer step: the global batch is global, over every rank of every node."""
        per_step = self.micro_batch_size * world_size
        if per_step > self.global_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) x world size ({world_size}) exceeds global_batch_size "
                f"({self.global_batch_size}): each rank needs at least one full micro-batch per step"
            )
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size x world size ({self.micro_batch_size} x {world_size})"
            )
        return self.global_batch_size // per_step

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir or Path("runs") / self.config_name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parser(prog: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, exit_on_error=False, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file (default configs/tiny.yaml)")
    parser.add_class_arguments(TrainConfig, as_group=False, skip={"config_name"})
    return parser


def parse_config(argv: list[str] | None = None, prog: str = "train.py", extra_args=None) -> TrainConfig:
    """TrainConfig from `--config FILE` (default configs/tiny.yaml) and `--key value` overrides.

    `extra_args(parser)` may add a tool's own flags; their values are set as attributes on the returned config.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    origin = branch_origin(argv)
    if origin is not None:  # the run branched from is the base; the command line overrides it
        saved = {k: v for k, v in origin["config"].items() if k != "config_name"}
        argv = ["--config", json.dumps(saved), *argv]
    elif not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    parser = _parser(prog)
    if extra_args is not None:
        extra_args(parser)
    namespace = parser.instantiate(parse_args(parser, argv))
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"config_name"}
    name = origin["config"]["config_name"] if origin else Path(str(namespace.config[0])).stem
    cfg = TrainConfig(**{k: namespace[k] for k in fields}, config_name=name)
    cfg.validate()
    if origin is not None:
        make_branch(cfg, origin)
    for key in namespace.keys():
        if key.split(".")[0] not in fields | {"config", "__path__"}:
            setattr(cfg, key, namespace[key])
    return cfg


def branch_origin(argv: list[str]) -> dict | None:
    """The checked JSON state of the `--branch_from` checkpoint, if the command line names one."""
    flag = argparse.ArgumentParser(add_help=False)
    flag.add_argument("--branch_from")
    path = flag.parse_known_args(argv)[0].branch_from
    return None if path is None else read_state(path)


def make_branch(cfg: TrainConfig, origin: dict) -> None:
    """Turn `cfg` (the origin's config with the command line's overrides) into a decay branch of the checkpoint:
    resumed from it (or from the branch's own newest checkpoint when run again), decaying over its last
    optim.decay_steps steps (default: as many as the run's own decay). The branch from step S for N steps is the
    run that was set from the start to decay over steps S+1..S+N, so the origin must still be in its stable phase
    at S: a wsd run, past warm-up, before its decay. The origin's directory is only read."""
    path = Path(cfg.branch_from)
    if origin.get("weights_only"):
        raise ValueError(f"{path}: holds weights only (no optimizer state or step); a branch needs a run's checkpoint")
    step = origin["step"]
    if cfg.out_dir is None or Path(cfg.out_dir).resolve() == path.resolve().parent.parent:
        raise ValueError(f"--branch_from {path} needs an --out_dir of its own, not the run it branches from")
    run = OptimConfig(**{k: v for k, v in origin["config"]["optim"].items() if k in OptimConfig.__annotations__})
    if run.schedule != "wsd":
        raise ValueError(f"{path}: a decay branch continues a wsd run; this run's optim.schedule is {run.schedule}")
    stable_end = origin["config"]["max_steps"] - wsd_decay_steps(run, origin["config"]["max_steps"])
    if not run.warmup_steps <= step <= stable_end:
        raise ValueError(
            f"{path}: step {step} is outside its run's stable phase (steps {run.warmup_steps} to {stable_end})"
        )
    check_same_shape(cfg.model, model_config(origin), path)
    branch_checkpoints = complete_checkpoints(Path(cfg.out_dir) / "checkpoints")
    if branch_checkpoints and read_state(branch_checkpoints[-1])["config"].get("branch_from") != cfg.branch_from:
        raise ValueError(f"--out_dir {cfg.out_dir} holds another run's checkpoints; choose a new directory")
    if cfg.optim.decay_steps is None:  # as long as the run's own decay
        cfg.optim.decay_steps = wsd_decay_steps(run, origin["config"]["max_steps"])
    cfg.max_steps = step + cfg.optim.decay_steps
    cfg.optim.schedule = "wsd"
    cfg.resume = "auto" if branch_checkpoints else str(path)
    cfg.init_from = None  # the weights come from the checkpoint


def wsd_decay_steps(cfg: OptimConfig, max_steps: int) -> int:
    """How many final steps a wsd schedule decays over: `decay_steps` if set, else `decay_fraction` of the run."""
    return cfg.decay_steps if cfg.decay_steps is not None else max(1, round(cfg.decay_fraction * max_steps))


def parse_args(parser: ArgumentParser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except ArgumentError as e:
        renamed = [f"{old} is now {new}" for old, new in RENAMED_KEYS.items() if old in str(e)]
        if renamed:
            raise ArgumentError(None, f"{e} ({'; '.join(renamed)})") from None
        raise


def model_preset(name: str) -> ModelConfig:
    """The model of configs/NAME.yaml (its `model:` section; the one place the presets' numbers are written)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ValueError(f"{path}: no such model preset {name!r}; choose from {names}")
    return ModelConfig.from_dict(yaml.safe_load(path.read_text())["model"])


def torchrun_world() -> tuple[int, int] | None:
    """(processes per node, nodes) when launched by torchrun, which sets these variables on every process."""
    if "LOCAL_WORLD_SIZE" in os.environ and "WORLD_SIZE" in os.environ:
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        return per_node, int(os.environ["WORLD_SIZE"]) // per_node
    return None
