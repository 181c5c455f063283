"""Model definitions and checkpoint loading (installed as ``etr.models``)."""

from etr.models.config import ModelConfig, load_model_config
from etr.models.decoder import DecoderLM
from etr.models.loader import load_model

__all__ = ["ModelConfig", "load_model_config", "DecoderLM", "load_model"]
