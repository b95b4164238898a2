"""Shared start of the peak-RSS subprocess scripts (tests/test_offload_model.py,
tests/test_offload_kvtier.py): imports, a warm-up of the code paths (oneDNN, the C++ kernels),
then ``base`` = VmRSS and the high-water mark reset (``/proc/self/clear_refs`` = 5), so that
``VmHWM - base`` at the end is what the script's own work held."""
import textwrap

RSS_PRELUDE = textwrap.dedent(r"""
    import json, sys, torch
    import torch.nn.functional as F
    import pykernels as pk
    import offload
    from roofline.probe import proc_kib_field
    F.linear(torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(64, 64, dtype=torch.bfloat16))
    _q = torch.randn(1, 4, 64, dtype=torch.bfloat16); _kv = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    pk.decode_attention(_q, _kv, _kv, torch.tensor([8]))
    base = proc_kib_field("/proc/self/status", "VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
""")
