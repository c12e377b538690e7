"""The training configuration: plain dataclasses, read from YAML and overridden by dotted command-line flags."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from model.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"
RENAMED_KEYS = {"skip_nan_batches": "optim.max_skipped_steps"}  # keys of earlier versions, named in their error


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (the schedule counts optimizer steps), the regularisers of the
    training objective and the guard against loss spikes."""

    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
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
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    parser = _parser(prog)
    if extra_args is not None:
        extra_args(parser)
    namespace = parser.instantiate(parse_args(parser, argv))
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"config_name"}
    cfg = TrainConfig(**{k: namespace[k] for k in fields}, config_name=Path(str(namespace.config[0])).stem)
    cfg.validate()
    for key in namespace.keys():
        if key.split(".")[0] not in fields | {"config", "__path__"}:
            setattr(cfg, key, namespace[key])
    return cfg


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
