"""bench/gpu_suite.py's summary table, from a made-up result (the suite itself needs a GPU)."""

import importlib.util
from pathlib import Path


def load_suite():
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_lists_every_figure_and_errors():
    import os
    before = os.environ.get("TRITON_INTERPRET")
    suite = load_suite()
    assert os.environ.get("TRITON_INTERPRET") == before  # later interpreted-kernel tests depend on it
    result = {"device": "FakeGPU", "date": "2026-11-23", "copy_GBps": 3000.0,
              "tests": {"rc": 0, "summary": "9 passed in 3.2s"},
              "lm_head": [{"B": 1, "kernel_ms": 0.41, "torch_ms": 0.9, "GBps": 3030.0, "frac_bw": 0.93,
                           "argmax_equal": True}],
              "attention": {"error": "RuntimeError: boom"},
              "prefill": {"prefix": 1536, "new": 512, "batch": 4, "triton_ms": 1.25, "gather_sdpa_ms": 3.5,
                          "max_abs_err": 0.01},
              "decode": [{"shape": "qwen2-7b", "batch": 1, "etr_ms_per_step": 6.1, "hf_ms_per_step": 20.0,
                          "speedup": 3.3, "floor_ms": 5.1}],
              "switch": {"overhead_pct": 0.4}}
    text = suite.table(result)
    assert "FakeGPU" in text and "9 passed" in text and "0.410 ms 93%bw" in text
    assert "1.250 ms" in text and "gather+SDPA 3.500 ms" in text
    assert "ERROR" in text and "boom" in text and "6.10 ms x3.30" in text and "+0.40%" in text
