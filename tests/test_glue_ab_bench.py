"""bench/glue_ab.py: a small run end to end prints its table, with and without the step's region on the raw side,
and leaves the region and the raw glue as they were."""

import pytest

from conftest import load_bench


@pytest.mark.parametrize("no_region", [False, True])
def test_a_small_run_prints_its_table_and_restores_the_region(tiny_dir, capsys, no_region):
    import torch
    from etr.kernels import cpu_decode_step
    if not cpu_decode_step.available():
        pytest.skip(f"the decode-step op is not built here: {cpu_decode_step.load_error()}")
    bench = load_bench("glue_ab")
    argv = ["--model", str(tiny_dir("llama_tied_gqa")), "--batch", "2", "--rounds", "2", "--steps", "1",
            "--check-tokens", "4"] + (["--no-region"] if no_region else [])
    before = torch.ops.etr_cpu_step.set_region(True)
    steps = torch.ops.etr_cpu_step.region_steps()
    try:
        code = bench.main(argv)
        if code == 1:
            pytest.skip("the raw glue is not in use here")
        assert code == 0
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if line.startswith("| 2 |")]
        assert len(rows) == 1 and len(rows[0].split("|")) == 7
        assert ("without" if no_region else "with the one region") in out
        assert torch.ops.etr_cpu_step.set_region(True) is True  # the run put it back
        if torch.ops.etr_cpu_linear.native() and torch.get_num_threads() >= 2:  # where the region can run at all
            assert (torch.ops.etr_cpu_step.region_steps() > steps) is not no_region
    finally:
        torch.ops.etr_cpu_step.set_region(before)
