"""The architecture as pure PyTorch modules: config, llama, attention, moe, loss, sampling."""

from model.config import ModelConfig
from model.llama import ModelOutput, Transformer, count_parameters

__all__ = ["ModelConfig", "ModelOutput", "Transformer", "count_parameters"]
