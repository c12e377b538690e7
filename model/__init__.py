"""The architecture as pure PyTorch modules, plus its weight formats."""

from model.config import PRESETS, ModelConfig
from model.llama import ModelOutput, Transformer, count_parameters

__all__ = ["PRESETS", "ModelConfig", "ModelOutput", "Transformer", "count_parameters"]
