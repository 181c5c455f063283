"""The package's bf16 linear op (kernels/cpu_bf16_linear.cpp) against float64 arithmetic on awkward sizes, and
the prepacked linear that uses it.

Tolerance, per output: |got - exact| <= 2**-8 |exact| + 2e-4 sum_k |w_k x_k|, the exact value computed in float64
from the same bf16 inputs. The first term is one rounding to bf16 (half an ulp: at most 2**-8 relative); the
second bounds float32 accumulation over up to 1,536 terms (k * 2**-24 * sum |w x| <= 9.2e-5 of it, which the
rounding can grow by 2**-8 of itself). On CPUs without AVX512-BF16 the tests run the op's plain C++ loop."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import require_cpp_op

from etr.kernels import cpu_bf16_linear as L
from etr.kernels import cpu_gemm


class _Built:  # require_cpp_op's view of the op: built, whatever the CPU (not whether it is the one chosen)
    available, load_error = staticmethod(L.built), staticmethod(L.load_error)


@pytest.fixture(scope="module")
def op():
    require_cpp_op(_Built, "CPU bf16 linear op")


def within_tolerance(got, x, w, b, want=None, times=1):
    """``got`` within the module's tolerance of the exact result (or within ``times`` it of ``want``)."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = 2**-8 * exact.abs() + 2e-4 * F.linear(x.double().abs(), w.double().abs())
    return bool(((got.double() - (exact if want is None else want.double())).abs() <= times * bound).all())


@pytest.mark.parametrize("out, k", [(1, 1), (7, 31), (33, 34), (64, 576), (100, 1001), (577, 1536), (192, 95)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_exact_arithmetic(op, out, k, bias):
    g = torch.Generator().manual_seed(out * 7 + k + bias)
    w = torch.randn(out, k, generator=g).bfloat16()
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    packed = L.pack(w)
    assert packed.shape == (-(-out // 32), -(-k // 2), 32, 2)
    for shape in [(k,), (1, k), (3, k), (5, k), (6, k), (7, k), (8, k), (13, k), (2, 25, k), (130, k)]:
        x = torch.randn(shape, generator=g).bfloat16()
        got = L.linear(x, packed, b, out)
        assert got.shape == (*shape[:-1], out) and got.dtype == torch.bfloat16
        want = L.reference(x, w, b)
        assert within_tolerance(got, x, w, b), shape
        assert within_tolerance(want, x, w, b) and within_tolerance(got, x, w, b, want, times=2)


@pytest.mark.parametrize("one_walk", [True, False])
def test_a_row_does_not_depend_on_how_many_rows_run_with_it(op, one_walk):
    """Every row count runs as its own mix of row tiles (one walk: up to 12 rows as one tile, more as 8s and then
    the rest as one; without: 8, 4, 2, 1, and 5 to 8 rows as 4 and the rest), and each tile sums in the same
    order, so every row's bits equal those of the row run alone, either way."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(70, 123, generator=g).bfloat16()
    packed = L.pack(w)
    x = torch.randn(50, 123, generator=g).bfloat16()
    before = L.set_one_walk(one_walk)
    try:
        alone = torch.cat([L.linear(x[i:i + 1], packed, None, 70) for i in range(50)])
        for rows in list(range(1, 30)) + [36, 44, 47, 48, 49, 50]:
            assert torch.equal(L.linear(x[:rows], packed, None, 70), alone[:rows]), rows
        assert L.set_one_walk(not one_walk) is one_walk
    finally:
        L.set_one_walk(before)


@pytest.mark.parametrize("out", [40, 600])
def test_thread_count_does_not_change_a_bit(op, out):
    """With fewer output blocks than threads (40 outputs: 2 blocks, 4 threads) the row chunks are split across
    threads too; every split gives the one-thread result."""
    g = torch.Generator().manual_seed(out)
    w, x = torch.randn(out, 70, generator=g).bfloat16(), torch.randn(130, 70, generator=g).bfloat16()
    packed, before = L.pack(w), torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(L.linear(x, packed, None, out))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results) and within_tolerance(results[0], x, w, None)


@pytest.mark.parametrize("out, rows", [(3000, 5), (3000, 16), (1000, 48), (130, 9)])
def test_balanced_runs_give_the_one_thread_bits(op, out, rows):
    """From 5 to 48 rows the threads take blocks from each other's runs when done (``balanced_runs``), which
    thread runs a block depends on timing, and no order may change a bit: 2-4 threads, 20 calls each, against one
    thread (out=130: 5 blocks, the fewest that 2 threads balance; 3 and 4 threads keep the static split there)."""
    g = torch.Generator().manual_seed(out + rows)
    w, x = torch.randn(out, 96, generator=g).bfloat16(), torch.randn(rows, 96, generator=g).bfloat16()
    packed, before = L.pack(w), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = L.linear(x, packed, None, out)
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            for _ in range(20):
                assert torch.equal(L.linear(x, packed, None, out), want), threads
    finally:
        torch.set_num_threads(before)
    assert within_tolerance(want, x, w, None)


def test_linear_reads_a_strided_input(op):
    w = torch.randn(40, 64).bfloat16()
    x = torch.randn(64, 6).bfloat16().t()[::2]  # 3 rows of 64, elements 6 apart: not contiguous
    assert within_tolerance(L.linear(x, L.pack(w), None, 40), x, w, None)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_full_and_partial_output_blocks_round_alike(op, rows):
    """Outputs 32-39 (a partial block) repeat the weights and bias of outputs 0-7 (in a full block of 32): their
    bits match, NaN rows included (one rounding for both, whichever the CPU's path)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(32, 16, generator=g).bfloat16()
    w, b = torch.cat([w, w[:8]]), torch.randn(32, generator=g).bfloat16()
    b = torch.cat([b, b[:8]])
    x = torch.randn(rows, 16, generator=g).bfloat16()
    x.view(torch.int16)[0, 3] = -63  # 0xFFC1: a NaN with its sign bit and a payload, which roundings differ on
    for bias in (None, b):
        got = L.linear(x, L.pack(w), bias, 40)
        assert got[0].isnan().all() and not got[1:].isnan().any()
        got = got.view(torch.int16)
        assert torch.equal(got[:, 32:], got[:, :8]), bias is None


def test_linear_names_what_it_cannot_take(op):
    w = torch.randn(8, 16).bfloat16()
    packed = L.pack(w)
    with pytest.raises(RuntimeError, match=r"inputs of 15 or 16 features expected, got sizes \[2, 18\]"):
        L.linear(torch.randn(2, 18).bfloat16(), packed, None, 8)
    with pytest.raises(RuntimeError, match="bf16 input and packed weight expected"):
        L.linear(torch.randn(16), packed, None, 8)
    with pytest.raises(RuntimeError, match="a weight from etr_cpu_linear.pack of 40 outputs expected"):
        L.linear(torch.randn(16).bfloat16(), packed, None, 40)
    with pytest.raises(RuntimeError, match="a bf16 bias of 8 expected"):
        L.linear(torch.randn(16).bfloat16(), packed, torch.randn(7).bfloat16(), 8)
    with pytest.raises(RuntimeError, match=r"a bf16 \[out, in\] weight expected"):
        L.pack(torch.randn(8, 16))


@pytest.mark.skipif(not cpu_gemm.packed_bf16_available(), reason="torch without oneDNN prepacking")
def test_packed_linear_runs_the_op_where_available(op, monkeypatch):
    monkeypatch.setattr(L, "available", lambda: True)  # as chosen on AVX512-BF16 CPUs without AMX
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(97, 40, generator=g).bfloat16(), torch.randn(97, generator=g).bfloat16()
    lin = cpu_gemm.PackedBf16Linear(w, b)
    assert lin.kind == "etr"
    x = torch.randn(5, 40, generator=g).bfloat16()
    assert torch.equal(lin(x), L.linear(x, L.pack(w), b, 97))


def test_off_switch_and_cpus_it_is_not_for(op, monkeypatch):
    loaded = L.OP  # a library registers its ops once per process: a second load would abort
    monkeypatch.setenv("ETR_CPU_LINEAR", "0")
    monkeypatch.setattr(L, "OP", L.CppOp("cpu_bf16_linear.cpp", "CPU bf16 linear op", "ETR_CPU_LINEAR"))
    assert not L.available() and L.load_error() == "turned off by ETR_CPU_LINEAR=0"
    if cpu_gemm.packed_bf16_available():
        assert cpu_gemm.PackedBf16Linear(torch.randn(8, 16).bfloat16()).kind == "onednn"
    monkeypatch.setattr(L, "OP", loaded)
    for flags, why in [({"avx2"}, "this CPU has no AVX512-BF16"),
                       ({"avx512_bf16", "amx_bf16"}, "this CPU has AMX: oneDNN's bf16 GEMM is used")]:
        monkeypatch.setattr(cpu_gemm, "cpu_flags", lambda: frozenset(flags))
        assert not L.available() and L.load_error() == why
        assert L.built()  # still there for the tests
    monkeypatch.setattr(cpu_gemm, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert L.available() == torch.ops.etr_cpu_linear.native() and L.load_error() is None


def test_dot_peak_is_a_rate_where_the_instruction_is(op):
    """The instruction's rate (bench/scaling.py's compute floor): a positive GFLOP/s with it, None without, and a
    named error for a count that runs nothing."""
    got = L.dot_peak(20_000)
    if torch.ops.etr_cpu_linear.native():
        # 64 FLOPs an instruction; no core issues more than 4 a cycle at 6 GHz: a loop folded away would exceed it.
        assert got is not None and 1.0 < got < torch.get_num_threads() * 6.0 * 4 * 64
    else:
        assert got is None
    for bad in (0, 2**22 + 1):  # the plain build checks its argument alike
        with pytest.raises(RuntimeError, match=rf"iterations must be in 1 \.\. 4194304 .*, got {bad}"):
            torch.ops.etr_cpu_linear.dot_peak(bad)


def test_a_header_an_op_includes_is_part_of_its_builds_name(tmp_path):
    """The GEMM's tiles live in a header that the linear and the decode-step ops both include: a changed header
    must give both a new build, or one of them would keep running the old tiles."""
    from etr.kernels import cpu_decode_step
    from etr.kernels.cpp_op import CppOp
    tile = Path(L.__file__).with_name("cpu_bf16_tile.h")
    assert tile in L.OP.headers() and tile in cpu_decode_step.OP.headers()
    op = CppOp("unused.cpp", "a test op", "ETR_TEST_OP")
    op.source = tmp_path / "op.cpp"
    op.source.write_text('#include <vector>\n  #  include "local.h"\n#include "absent.h"\nint f() { return LOCAL; }\n')
    (tmp_path / "local.h").write_text('#include "inner.h"\n#define LOCAL INNER\n')
    (tmp_path / "inner.h").write_text("#define INNER 1\n")
    first = op.name()
    assert op.headers() == [tmp_path / "local.h", tmp_path / "inner.h"]  # what is not beside it is not ours
    (tmp_path / "inner.h").write_text("#define INNER 2\n")
    assert op.name() != first


def test_a_header_is_looked_up_beside_the_file_that_includes_it(tmp_path, monkeypatch):
    """As the compiler resolves ``#include "x.h"`` in our builds: beside the including file as reached (a header in
    a folder of its own finds its siblings there, ``..`` climbs from there, a symlinked header's includes are
    looked up beside the link), each header once; and the compiler flags are part of the build's name."""
    from etr.kernels import cpp_op
    op = cpp_op.CppOp("unused.cpp", "a test op", "ETR_TEST_OP")
    op.source = tmp_path / "op.cpp"
    for folder in ("sub", "other"):
        (tmp_path / folder).mkdir()
    op.source.write_text('#include "sub/a.h"\n#include "top.h"\n#include "link.h"\n')
    (tmp_path / "sub" / "a.h").write_text('#include "b.h"\n#include "../top.h"\n#include "top.h"\n')
    (tmp_path / "sub" / "b.h").write_text("#define B 1\n")
    (tmp_path / "b.h").write_text("#define B 2\n")  # not sub/a.h's b.h: that one is beside it
    (tmp_path / "top.h").write_text("#define TOP 1\n")  # sub/a.h's "top.h" (no sub/top.h) is not found
    (tmp_path / "other" / "real.h").write_text('#include "c.h"\n')
    (tmp_path / "other" / "c.h").write_text("#define C 1\n")  # the link's target's sibling: not the one used
    (tmp_path / "c.h").write_text("#define C 2\n")
    (tmp_path / "link.h").symlink_to(tmp_path / "other" / "real.h")
    got = op.headers()
    assert got == [tmp_path / "sub" / "a.h", tmp_path / "top.h", tmp_path / "link.h", tmp_path / "c.h",
                   tmp_path / "sub" / "b.h"]  # depth first from the last include; ../top.h once, as ./top.h
    first = op.name()
    (tmp_path / "sub" / "b.h").write_text("#define B 3\n")
    assert op.name() != first
    second = op.name()
    (tmp_path / "c.h").write_text("#define C 3\n")
    assert op.name() != second
    third = op.name()
    (tmp_path / "other" / "c.h").write_text("#define C 4\n")  # not included by anything the compiler reads
    assert op.name() == third
    monkeypatch.setattr(cpp_op, "FLAGS", cpp_op.FLAGS + ["-DANOTHER_FLAG"])
    assert op.name() != third


@pytest.mark.parametrize("out, k", [(40, 576), (577, 1536), (3, 9)])
def test_the_stream_hint_changes_no_bit(op, out, k):
    """The tiles that walk a block once (1-12 rows) with and without their non-temporal prefetches (which reach
    past the weight's end on its last block: a hint, never a fault; off, 5-12 rows fetch the next block instead)
    give the same bits, and so do 13 rows (two tiles, never streaming); set_stream_hint returns the previous
    setting."""
    if not torch.ops.etr_cpu_linear.native():
        pytest.skip("built without the bf16 dot instruction: no streaming tiles to switch")
    g = torch.Generator().manual_seed(out + k)
    w = torch.randn(out, k, generator=g).bfloat16()
    packed = L.pack(w)
    x = torch.randn(13, k, generator=g).bfloat16()
    before, walk = L.set_stream_hint(True), L.set_one_walk(True)  # 5-12 rows stream only with the one walk
    try:
        on = [L.linear(x[:rows], packed, None, out) for rows in range(1, 14)]
        assert L.set_stream_hint(False) is True
        off = [L.linear(x[:rows], packed, None, out) for rows in range(1, 14)]
        assert L.set_stream_hint(True) is False
    finally:
        L.set_stream_hint(before)
        L.set_one_walk(walk)
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    assert all(within_tolerance(a, x[:a.shape[0]], w, None) for a in on)


@pytest.mark.parametrize("switch", ["set_stream_hint", "set_prefetch", "set_one_walk"])
def test_each_op_has_its_own_stream_hint_and_prefetch(op, switch):
    """The linear op and the decode step's op each switch their own copy of the hint, the prefetch and the one
    walk (the GEMM's header gives its globals internal linkage: one shared symbol would let either op switch
    both)."""
    from etr.kernels import cpu_decode_step
    if not cpu_decode_step.available():
        pytest.skip(f"the decode-step op is not built here: {cpu_decode_step.load_error()}")
    linear_op, step_op = getattr(L, switch), getattr(cpu_decode_step, switch)
    before = (linear_op(True), step_op(True))
    try:
        linear_op(False)
        assert step_op(True) is True
        step_op(False)
        assert linear_op(True) is False
    finally:
        linear_op(before[0])
        step_op(before[1])
