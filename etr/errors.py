"""Every exception the engine raises on purpose.

All derive from :class:`ETRError`; those caused by a bad argument also derive from :class:`ValueError`,
so callers that already catch ``ValueError`` keep working.
"""


class ETRError(Exception):
    """Base class of all errors raised by etr."""


class ConfigError(ETRError, ValueError):
    """A model's config.json is missing, unreadable or asks for something unsupported, or an engine
    setting (block_size, max_num_seqs, ...) is out of range."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture (model_type) is not one the engine implements."""


class CheckpointError(ETRError):
    """A checkpoint's weight files do not match its config."""


class CorruptCheckpointError(CheckpointError):
    """A weight file is truncated or otherwise not readable as safetensors (the message names the file)."""


class MissingTensorError(CheckpointError):
    """A tensor the model needs is not in any weight file."""


class TensorShapeError(CheckpointError):
    """A tensor in a weight file has another shape than the config implies."""


class UnexpectedTensorError(CheckpointError):
    """A weight file holds a tensor the model has no place for (usually a wrong architecture)."""


class TokenizerMissingError(ETRError, ValueError):
    """Text was given but the checkpoint has no tokenizer files."""


class InvalidSamplingParamsError(ETRError, ValueError):
    """A SamplingParams field is out of range."""


class InvalidPromptError(ETRError, ValueError):
    """A prompt is empty, malformed, or holds token ids outside the vocabulary."""


class PromptTooLongError(InvalidPromptError):
    """A prompt does not fit in max_model_len (or in the KV pool)."""


class UnsupportedDTypeError(ETRError, ValueError):
    """The requested dtype is not one the engine runs in."""


class UnsupportedDeviceError(ETRError, ValueError):
    """The requested device does not exist or is not supported."""


class KVCacheError(ETRError, ValueError):
    """The KV-cache pool cannot be built with the requested size."""


class GGUFImportError(ETRError):
    """A GGUF file could not be turned into an HF checkpoint directory."""


class ExpertHeadError(ETRError, ValueError):
    """An expert head file is malformed or does not fit the meta model or the ``experts=`` mapping."""


class VocabularyMismatchError(ETRError, ValueError):
    """An expert does not share the meta model's vocabulary or tokenizer."""


class EngineDeadError(ETRError):
    """The engine loop stopped on an error; every waiting and later request fails with this (``__cause__``
    holds the original exception)."""


class QueueFullError(ETRError):
    """A request was refused because the engine already holds as many requests as it may queue."""


class DuplicateRequestError(ETRError, ValueError):
    """A request id is already in use by a request that has not finished."""


class ExpertUnavailableError(ETRError):
    """A remote expert (a Ray actor) could not be placed or loaded in time, or died: the message names the
    expert and the cause. Requests it held fail with this; later requests routed to it fail at once.
    Raised by ``LLM.generate``, ``outputs`` holds every output of the call (the failed ones with
    finish_reason "error")."""
    outputs: list | None = None
