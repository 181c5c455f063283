"""The paged KV-cache generation engine (installed as ``etr.engine``)."""

from etr.engine.config import EngineConfig
from etr.engine.llm_engine import LLMEngine
from etr.engine.outputs import RequestMetrics, RequestOutput, StreamDelta
from etr.engine.sampling_params import SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams", "StreamDelta"]
