"""Named spans of the engine's phases in a ``torch.profiler`` trace, so that a step, a hand-over and an
expert's prefill stand out in Perfetto among the raw ops, and ``phase_totals`` sums a trace by phase.

Outside a profiler a span is one flag check (bench/RESULTS.md, "Measurements behind code choices")."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.autograd.profiler import record_function

PREFIX = "etr: "  # every phase's span name starts so; phase_totals finds them by it
_OFF = nullcontext()


def phase(name: str):
    """A span named ``etr: {name}`` while a profiler records, else a no-op context."""
    return record_function(PREFIX + name) if torch.autograd._profiler_enabled() else _OFF


def step_kind(num_seqs: int, num_decodes: int) -> str:
    """How a step's forward is named: decode, prefill, or prefill+decode (a mixed step)."""
    return "decode" if num_decodes == num_seqs else "prefill" if num_decodes == 0 else "prefill+decode"


def phase_totals(prof) -> list[tuple[str, int, float]]:
    """``(phase, calls, total ms)`` of every phase span a finished ``torch.profiler.profile`` recorded, longest
    first. Spans nest (a step holds its forward and sampling), so totals do not add up to the wall time."""
    rows = [(e.key[len(PREFIX):], e.count, e.cpu_time_total / 1e3) for e in prof.key_averages()
            if e.key.startswith(PREFIX)]
    return sorted(rows, key=lambda r: -r[2])


def format_totals(rows: list[tuple[str, int, float]]) -> str:
    """The rows of ``phase_totals`` as an aligned text table."""
    lines = [f"{'phase':<32} {'calls':>6} {'total ms':>10} {'ms/call':>9}"]
    lines += [f"{name:<32} {calls:>6} {ms:>10.2f} {ms / calls:>9.3f}" for name, calls, ms in rows]
    return "\n".join(lines)
