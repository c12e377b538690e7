"""Hugging Face Llama and Mixtral formats: config.json <-> ModelConfig, and our weight names <-> theirs.

Our rotary embeddings already follow HF Llama's rotate-half convention, so the weights map by renaming alone (no
q/k permutation). Mixtral experts are written one tensor per expert, `block_sparse_moe.experts.E.w1|w2|w3.weight`,
the layout transformers' own save_pretrained writes (transformers 5 fuses them on load); we store them stacked.
Weights are read with safetensors only: nothing here unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from formats.checkpoint import CheckpointError
from model.config import ModelConfig
from model.llama import Transformer

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}

# Our config field -> its config.json key; MoE ones only for Mixtral.
CONFIG_KEYS = {
    "n_layers": "num_hidden_layers",
    "dim": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}
MOE_CONFIG_KEYS = {"num_experts": "num_local_experts", "top_k": "num_experts_per_tok"}

# Our per-layer weight names -> HF's, under `layers.N.` and `model.layers.N.`.
ATTENTION_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
DENSE_FFN_NAMES = {
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}
ROUTER_NAMES = {"ffn.router.weight": "block_sparse_moe.gate.weight"}
EXPERT_NAMES = {"ffn.gate_proj": "w1", "ffn.up_proj": "w3", "ffn.down_proj": "w2"}  # stacked [E, ...] in ours


class WeightSlot(NamedTuple):
    """One HF tensor and where it lives in our state dict: a whole entry, or one expert of a stacked one."""

    ours: str
    expert: int | None
    hf: str


def weight_slots(cfg: ModelConfig) -> list[WeightSlot]:
    """Every tensor of the HF checkpoint of a model of this config (a tied head is not a tensor of its own)."""
    slots = [
        WeightSlot("tok_embeddings.weight", None, "model.embed_tokens.weight"),
        WeightSlot("norm.weight", None, "model.norm.weight"),
    ]
    if not cfg.tie_embeddings:
        slots.append(WeightSlot("lm_head.weight", None, "lm_head.weight"))
    layer_names = {**ATTENTION_NAMES, **(ROUTER_NAMES if cfg.is_moe else DENSE_FFN_NAMES)}
    for i in range(cfg.n_layers):
        slots += [WeightSlot(f"layers.{i}.{ours}", None, f"model.layers.{i}.{hf}") for ours, hf in layer_names.items()]
        if cfg.is_moe:
            slots += [
                WeightSlot(f"layers.{i}.{ours}", e, f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight")
                for ours, w in EXPERT_NAMES.items()
                for e in range(cfg.num_experts)
            ]
    return slots


def hf_state_dict(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under HF names; views of our tensors, no copies."""
    return {s.hf: weights[s.ours] if s.expert is None else weights[s.ours][s.expert] for s in weight_slots(cfg)}


def hf_config(cfg: ModelConfig, dtype: torch.dtype, bos_id: int, eos_id: int) -> dict:
    """config.json, every field stated: transformers' defaults differ from ours (Mixtral's theta, Llama's eps)."""
    model_type = "mixtral" if cfg.is_moe else "llama"
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        **{hf: getattr(cfg, ours) for ours, hf in CONFIG_KEYS.items()},
        # transformers 5 reads rope_parameters; older readers (and other tools) read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.is_moe:
        config.update({hf: getattr(cfg, ours) for ours, hf in MOE_CONFIG_KEYS.items()})
        config.update(
            # HF's balance loss counts each of a token's top_k slots as a whole token: top_k times ours.
            router_aux_loss_coef=cfg.aux_loss_coef / cfg.top_k,
            output_router_logits=False,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    else:
        config["mlp_bias"] = False
    return config


def read_hf_config(path: Path) -> PreTrainedConfig:
    """The transformers config object of a Llama or Mixtral directory (its defaults fill the keys not stated)."""
    file = path / CONFIG_FILE
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{file}: not a readable Hugging Face config ({e})") from None
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{file}: model_type {model_type!r} is not supported (only {' and '.join(ARCHITECTURES)})")
    from transformers import AutoConfig  # slow to import: only when a Hugging Face directory is used

    return AutoConfig.from_pretrained(path, local_files_only=True)


def unsupported_features(hf: PreTrainedConfig) -> list[str]:
    """What a Llama/Mixtral config may ask for that our architecture does not have."""
    rope_type = (hf.rope_parameters or {}).get("rope_type", "default")
    sliding_window = getattr(hf, "sliding_window", None)
    head_dim, our_head_dim = getattr(hf, "head_dim", None), hf.hidden_size // hf.num_attention_heads
    checks = {
        f"rope_type {rope_type!r}": rope_type != "default",
        f"hidden_act {hf.hidden_act!r}": hf.hidden_act != "silu",
        "attention_bias": getattr(hf, "attention_bias", False),
        "mlp_bias": getattr(hf, "mlp_bias", False),
        f"sliding_window {sliding_window}": sliding_window is not None,
        f"head_dim {head_dim} != hidden_size / num_attention_heads": head_dim not in (None, our_head_dim),
    }
    return [feature for feature, present in checks.items() if present]


def config_from_hf(path: str | Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama or Mixtral directory."""
    path = Path(path)
    hf = read_hf_config(path)
    problems = unsupported_features(hf)
    if problems:
        raise ValueError(f"{path / CONFIG_FILE}: not supported by our architecture: {', '.join(problems)}")
    # transformers 5 keeps rope_theta only inside rope_parameters (filled in with its default when not stated)
    fields = {ours: getattr(hf, key) for ours, key in CONFIG_KEYS.items() if key != "rope_theta"}
    fields["rope_theta"] = float(hf.rope_parameters["rope_theta"])
    if hf.model_type == "mixtral":
        fields.update({ours: getattr(hf, key) for ours, key in MOE_CONFIG_KEYS.items()})
    return ModelConfig(**fields)


def check_config(cfg: ModelConfig, path: str | Path) -> None:
    """Raise ValueError naming every field of `cfg` that contradicts path/config.json."""
    path = Path(path)
    theirs = config_from_hf(path)
    keys = {**CONFIG_KEYS, "num_experts": "num_local_experts"}
    if cfg.is_moe and theirs.is_moe:
        keys["top_k"] = "num_experts_per_tok"
    mismatches = [
        f"model.{ours} {getattr(cfg, ours)} != {hf} {getattr(theirs, ours)}"
        for ours, hf in keys.items()
        if getattr(cfg, ours) != getattr(theirs, ours)
    ]
    if mismatches:
        raise ValueError(f"init_from {path}: {'; '.join(mismatches)} in {path / CONFIG_FILE}")


def open_safetensors(file: Path) -> safe_open:
    """A safetensors file opened for reading (its header checked against its size); else an error naming it."""
    try:
        return safe_open(file, "pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def weight_files(path: Path) -> dict[str, Path]:
    """{HF tensor name: the safetensors file holding it}, from the shard index or the single file."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{index}: not a readable safetensors index ({e!r})") from None
        return {name: path / file for name, file in weight_map.items()}
    single = path / WEIGHTS_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise ValueError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (only safetensors weights are read)")


# (our weight's name, its whole shape, a slice per dim) -> the values of that slice
SliceReader = Callable[[str, torch.Size, tuple[slice, ...]], torch.Tensor]


@contextmanager
def hf_weight_reader(path: str | Path, cfg: ModelConfig) -> Iterator[SliceReader]:
    """`read(name, shape, index)`: our weight `name`, whose whole shape is `shape`, restricted to `index` (a slice
    per dim, `()` for all of it), read from the safetensors files of a Hugging Face directory whose config matches
    `cfg`. Only that slice's bytes are copied out of the files (safetensors' get_slice); a stacked expert weight is
    put together from the slices of HF's per-expert tensors. Each HF shape is checked against `shape`."""
    path = Path(path)
    check_config(cfg, path)
    files = weight_files(path)
    slots = weight_slots(cfg)
    missing = [s.hf for s in slots if s.hf not in files]
    if missing:
        raise ValueError(f"{path}: {len(missing)} weight(s) missing from its safetensors files, e.g. {missing[0]}")
    slots_of: dict[str, list[WeightSlot]] = {}
    for s in slots:
        slots_of.setdefault(s.ours, []).append(s)

    with ExitStack() as stack:
        readers = {file: stack.enter_context(open_safetensors(file)) for file in set(files.values())}

        def read_slot(slot: WeightSlot, shape: torch.Size, index: tuple[slice, ...]) -> torch.Tensor:
            tensor = readers[files[slot.hf]].get_slice(slot.hf)
            if list(tensor.get_shape()) != list(shape):
                raise ValueError(f"{path}: {slot.hf} has shape {tensor.get_shape()}, expected {list(shape)}")
            return tensor[index]

        def read(name: str, shape: torch.Size, index: tuple[slice, ...]) -> torch.Tensor:
            found = slots_of[name]
            if found[0].expert is None:
                return read_slot(found[0], shape, index)
            experts, rest = (index[0], index[1:]) if index else (slice(None), ())
            parts = [read_slot(s, shape[1:], rest) for s in found[experts]]
            return torch.stack(parts) if parts else torch.empty(0, *shape[1:])[(slice(None), *rest)]

        yield read


def is_hf_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


@torch.no_grad()
def load_hf_weights(model: Transformer, path: str | Path) -> None:
    """Copy the weights of a Hugging Face Llama/Mixtral directory into `model` (whole, in one process), whose
    config must match it. training/materialize.py loads each rank's shards alone."""
    with hf_weight_reader(path, model.cfg) as read:
        for name, param in model.named_parameters():
            param.copy_(read(name, param.shape, ()))
