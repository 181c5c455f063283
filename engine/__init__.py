"""The paged KV-cache generation engine (installed as ``etr.engine``)."""

from etr.engine.llm_engine import EngineConfig, LLMEngine
from etr.engine.outputs import RequestMetrics, RequestOutput, StreamDelta
from etr.engine.sampling_params import SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams", "StreamDelta"]
