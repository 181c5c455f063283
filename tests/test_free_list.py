"""The free-block list: least recently freed first, and a block put in another's place."""

import random

import pytest

from etr.engine.free_list import FreeList


def test_order_remove_append():
    f = FreeList(5)
    assert list(f) == [0, 1, 2, 3, 4] and len(f) == 5 and f.first() == 0
    f.remove(0)
    f.remove(3)
    assert list(f) == [1, 2, 4] and 3 not in f and 2 in f and 7 not in f and -1 not in f
    f.append(3)
    f.append(0)
    assert list(f) == [1, 2, 4, 3, 0] and len(f) == 5


@pytest.mark.parametrize("old,new,want", [
    (2, 0, [1, 0, 3, 4]),   # new before old, not neighbours
    (2, 1, [0, 1, 3, 4]),   # new just before old
    (2, 3, [0, 1, 3, 4]),   # new just after old
    (0, 4, [4, 1, 2, 3]),   # old at the head, new at the tail
    (4, 0, [1, 2, 3, 0]),   # old at the tail, new at the head
])
def test_replace_puts_new_in_olds_place(old, new, want):
    f = FreeList(5)
    f.replace(old, new)
    assert list(f) == want and len(f) == 4 and old not in f and new in f
    assert f.first() == want[0] and f.tail == want[-1]
    assert [f.prev[b] for b in want] == [-1, *want[:-1]] and [f.next[b] for b in want] == [*want[1:], -1]


def test_errors_name_the_block():
    f = FreeList(2)
    f.remove(1)
    with pytest.raises(KeyError, match="block 1 is not free"):
        f.remove(1)
    with pytest.raises(KeyError, match="block 0 is already free"):
        f.append(0)
    f.remove(0)
    with pytest.raises(IndexError, match="no free block"):
        f.first()
    g = FreeList(3)
    g.remove(1)
    for old, new in ((1, 2), (2, 2)):
        with pytest.raises(KeyError, match=f"block {new} in the place of block {old}"):
            g.replace(old, new)
    assert list(g) == [0, 2] and len(g) == 2
    assert list(f) == [] and list(FreeList(0)) == []


def test_random_operations_match_a_plain_list():
    rng = random.Random(0)
    for n in (1, 2, 3, 7):
        f, model = FreeList(n), list(range(n))
        for _ in range(400):
            taken = [b for b in range(n) if b not in model]
            op = rng.choice(["remove", "append", "replace"])
            if op == "remove" and model:
                b = rng.choice(model)
                f.remove(b)
                model.remove(b)
            elif op == "append" and taken:
                b = rng.choice(taken)
                f.append(b)
                model.append(b)
            elif op == "replace" and len(model) > 1:
                old, new = rng.sample(model, 2)
                f.replace(old, new)
                model.remove(new)
                model[model.index(old)] = new
            assert list(f) == model and len(f) == len(model)
            assert [b for b in range(n) if b in f] == sorted(model)
            assert f.head == (model[0] if model else -1) and f.tail == (model[-1] if model else -1)
            assert [f.prev[b] for b in model] == [-1, *model[:-1]][:len(model)]


def test_run_starts_match_a_plain_scan():
    """The starts of free runs in ``[lo, hi)``, found by byte search, against a block-by-block scan; ranges that
    begin before the pool, inside a run, on a block in use, and end past the pool."""
    rng = random.Random(1)
    for n in (1, 2, 5, 40):
        for _ in range(200):
            f = FreeList(n)
            for b in rng.sample(range(n), rng.randint(0, n)):
                f.remove(b)
            lo, hi = rng.randint(0, n + 1), rng.randint(0, n + 3)
            want = [b for b in range(max(lo, 0), min(hi, n)) if b in f and (b == 0 or b - 1 not in f)]
            assert list(f.run_starts(lo, hi)) == want, (n, lo, hi, [b in f for b in range(n)])
    f = FreeList(6)
    for b in (0, 3):
        f.remove(b)
    assert list(f.run_starts(0, 6)) == [1, 4] and list(f.run_starts(2, 6)) == [4] and list(f.run_starts(5, 6)) == []
    f.append(0)
    assert list(f.run_starts(0, 6)) == [0, 4] and list(f.run_starts(0, 0)) == [] and list(f.run_starts(0, -1)) == []
    taken = []  # a caller that takes each block it is given: the next block starts a run in turn
    for b in f.run_starts(0, 3):
        f.remove(b)
        taken.append(b)
    assert taken == [0, 1, 2]
