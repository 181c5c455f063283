"""bench/gpu_suite.py: its summary table from a made-up result, and the whole suite at toy sizes on the CPU
(``--smoke``), so the code a lent GPU runs has run before."""

import sys

from conftest import load_bench


def load_suite():
    return load_bench("gpu_suite")


def test_table_lists_every_figure_and_errors():
    import os
    before = os.environ.get("TRITON_INTERPRET")
    suite = load_suite()
    assert os.environ.get("TRITON_INTERPRET") == before  # later interpreted-kernel tests depend on it
    result = {"device": "FakeGPU", "date": "2026-11-23", "copy_GBps": 3000.0,
              "tests": {"rc": 1, "summary": "1 failed, 8 passed in 3.2s",
                        "failed": ["FAILED tests/test_gpu.py::test_x - AssertionError: bad"]},
              "lm_head": [{"B": 1, "kernel_ms": 0.41, "torch_ms": 0.9, "GBps": 3030.0, "frac_bw": 0.93,
                           "argmax_equal": True}],
              "attention": {"error": "RuntimeError: boom"},
              "prefill": {"prefix": 1536, "new": 512, "batch": 4, "triton_ms": 1.25, "gather_sdpa_ms": 3.5,
                          "max_abs_err": 0.01},
              "decode": [{"shape": "qwen2-7b", "batch": 1, "etr_ms_per_step": 6.1, "tok_s": 163.9, "hf_ms_per_step": 20.0,
                          "speedup": 3.3, "floor_ms": 5.1}],
              "switch": {"shape": "qwen2-7b", "new_tokens": 256, "overhead_pct": 0.4,
                         "expert_prefill_s_per_query": 0.012}}
    text = suite.table(result)
    assert "FakeGPU" in text and "8 passed" in text and "test_x" in text and "AssertionError: bad" in text
    assert "0.410 ms 93%bw" in text and "qwen2-7b, 256 tokens" in text and "prefill 12.0 ms" in text
    assert "1.250 ms" in text and "gather+SDPA 3.500 ms" in text
    assert "ERROR" in text and "boom" in text and "6.10 ms 164 t/s x3.30" in text and "+0.40%" in text


def test_smoke_run_covers_every_step(tmp_path, capsys):
    """Every step of the suite runs on the CPU at toy sizes without an error, and the JSON holds them all."""
    import json
    suite = load_suite()
    assert suite.main(["--smoke", "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    steps = ("tests", "lm_head", "attention", "prefill", "decode", "switch")
    assert [s for s in steps if s not in result or "error" in result[s]] == []
    assert result["tests"]["rc"] in (0, 5) and all(r["argmax_equal"] for r in result["lm_head"])
    assert {(r["backend"], r["batch"]) for r in result["decode"]} == \
        {(b, n) for b in ("torch", "triton", "triton+fused") for n in (1, 3)}
    assert result["prefill"]["max_abs_err"] < 5e-2
    assert "ERROR" not in capsys.readouterr().out
    assert set(result["seconds"]) == set(steps)


def test_steps_past_the_budget_are_reported_not_run(tmp_path, capsys):
    import json
    suite = load_suite()
    suite.main(["--smoke", "--budget-s", "0", "--skip", "tests", "--out", str(tmp_path / "s.json")])
    result = json.loads((tmp_path / "s.json").read_text())
    assert "tests" not in result and "budget" in result["lm_head"]["error"] and "budget" in result["switch"]["error"]
    assert "not run" in capsys.readouterr().out


def test_source_tree_imports_like_the_installed_package(tmp_path):
    """The GPU machine gets the checkout as source only: the suite's symlinked layout must import every
    subpackage from it (here ahead of the installed copy) and match pyproject's package-dir."""
    import os
    import subprocess
    import pytest
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    load_suite()  # puts bench/ on sys.path
    import suite_process as suite
    pyproject = tomllib.loads((suite.ROOT / "pyproject.toml").read_text())
    dirs = pyproject["tool"]["setuptools"]["package-dir"]
    assert {k: v for k, v in dirs.items() if k != "etr"} == {f"etr.{n}": n for n in suite.SUBPACKAGES}
    tree = suite.source_tree(tmp_path / "tree")
    code = "import etr, etr.engine, etr.kernels.lm_head, etr.models, etr.routing.miniexpert; print(etr.engine.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tree)}, check=True).stdout
    assert out.strip() == str(tree / "etr" / "engine" / "__init__.py")
    assert not (suite.ROOT / "etr" / "engine").exists()  # nothing written into the checkout


def test_a_step_past_the_deadline_is_killed_and_the_table_still_prints(tmp_path, capsys):
    """Each step runs in its own process with the suite's deadline: a hang costs that step only."""
    import json
    suite = load_suite()
    skip = ["tests", "attention", "prefill", "decode", "switch"]
    assert suite.main(["--smoke", "--deadline-s", "0", "--skip", *skip, "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["lm_head"]["error"].startswith("killed after")
    assert "ERROR" in capsys.readouterr().out


def test_in_process_steps(tmp_path):
    """``--in-process``: the same steps without child processes."""
    import json
    suite = load_suite()
    skip = ["tests", "decode", "switch"]
    assert suite.main(["--smoke", "--in-process", "--skip", *skip, "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert all("error" not in result[s] for s in ("lm_head", "attention", "prefill"))
