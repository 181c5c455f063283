"""Expert Token Routing: a meta LLM plus domain experts behaving as one model.

The public API::

    from etr import LLM, SamplingParams
    llm = LLM(model="checkpoint_dir")
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=32))[0]
"""

from etr.engine.outputs import RequestMetrics, RequestOutput, StreamDelta
from etr.engine.sampling_params import SamplingParams
from etr.errors import *  # noqa: F401,F403  (the named exceptions are part of the API)
from etr.errors import ETRError
from etr.llm import LLM
from etr.async_llm import AsyncLLM

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "RequestMetrics", "StreamDelta", "ETRError"]
