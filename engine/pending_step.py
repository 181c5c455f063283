"""A launched step whose tokens may still be on their way: what ``LLMEngine.launch`` returns and
``LLMEngine.finish`` consumes.

On CUDA each model works on its own device and stream, and its tokens come back through a pinned host buffer
behind an event, so the switcher can launch every engine's step before it waits for any: an expert's prefill
after a switch runs while the meta decodes its batch. On the CPU the work is done by the time ``launch``
returns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from etr.engine.sequence import Sequence


@dataclass(slots=True)
class PendingStep:
    """One engine's launched step: its batch, and its tokens once ``wait`` returns."""
    seqs: list[Sequence]  # decodes first
    num_decodes: int  # the rest prefill
    tokens: torch.Tensor  # on the host; complete once `ready` has completed
    ready: torch.cuda.Event | None  # None: computed synchronously
    started: torch.cuda.Event | None
    host_seconds: float  # wall time of the launch (on the CPU: of the whole step)

    def wait(self) -> list[int]:
        """The step's tokens, one per sequence, once the device has produced them."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()

    def seconds(self) -> float:
        """How long the step took on its device: between events around its work on CUDA (so neither the
        other engines' launches nor the wait count), the launch's wall time on the CPU. After ``wait``."""
        if self.started is None:
            return self.host_seconds
        return self.started.elapsed_time(self.ready) / 1e3


def host_to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device`` without making the host wait: on CUDA through pinned
    memory, copied asynchronously on the current stream (a copy from pageable memory would first wait for
    every kernel already queued on it)."""
    t = torch.tensor(data, dtype=dtype)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


class DeviceStream:
    """A model's own CUDA stream and device; on the CPU, nothing."""
    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def active(self):
        """Make the model's device and stream current (Triton launches on the current device's stream).
        The stream first waits for the caller's stream on that device, where weights, pools and graphs were
        set up."""
        if self.stream is None:
            yield
            return
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                yield

    def event(self) -> torch.cuda.Event | None:
        """A timing event recorded now on the stream (None on the CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying ``tokens`` to the host; returns the host tensor and the event that marks it done."""
        if self.stream is None:
            return tokens, None
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        return host, self.event()
