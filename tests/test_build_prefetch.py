"""The built CPU kernels keep their software prefetches.

GCC treats __builtin_prefetch as free of side effects: a helper whose only work is prefetching
is found pure and every call to it is deleted. That once removed all prefetches from the bf16
attention kernel (5.2 ms instead of 3.3 ms at L=16k, with every test still green), so the
machine code of the built extension is checked here: each instantiation of the attention
walkers must contain prefetch instructions.
"""
import re
import shutil
import subprocess
from collections import Counter

import pytest

_C = pytest.importorskip("pykernels._C", reason="pykernels._C is not built")

_FUNC = re.compile(r"^[0-9a-f]+ <(.*)>:$")


def _prefetch_counts():
    objdump = shutil.which("objdump")
    if objdump is None:  # binutils comes with the compiler that built _C
        pytest.fail("objdump not found (binutils); it is needed to inspect the built kernels")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _C.__file__], check=True,
                          capture_output=True, text=True).stdout
    counts, names, fn = Counter(), set(), None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            fn = m.group(1)
            names.add(fn)
        elif fn is not None and "prefetch" in line:
            counts[fn] += 1
    return counts, names


@pytest.mark.parametrize("walker", ["attend_group<", "kv_attend<"])
def test_every_walker_instantiation_prefetches(walker):
    counts, names = _prefetch_counts()
    walkers = sorted(n for n in names if f"::{walker}" in n)
    assert len(walkers) >= 4, f"expected per-ISA instantiations of {walker}, found {walkers}"
    missing = [n for n in walkers if counts[n] == 0]
    assert not missing, f"{len(missing)} of {len(walkers)} instantiations have no prefetch: {missing[:3]}"
