"""pykernels.memory: KV-cache storage on transparent huge pages."""
import gc

import pytest
import torch

import pykernels as pk
from pykernels import memory


@pytest.mark.parametrize("shape,dtype", [((3, 5, 7), torch.bfloat16), ((1, 1000, 3, 64), torch.float32),
                                         ((4 << 20,), torch.uint8), (17, torch.float16)])
def test_empty_hugepages_is_a_plain_tensor(shape, dtype):
    t = memory.empty_hugepages(shape, dtype)
    want = (shape,) if isinstance(shape, int) else shape
    assert t.shape == torch.Size(want) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    assert t.data_ptr() % (2 << 20) == 0  # aligned to a huge page
    t.copy_(torch.arange(t.numel()).reshape(t.shape).to(dtype))
    view = t.reshape(-1)[-3:]
    del t
    gc.collect()  # the mapping must live as long as any view of it
    n = view.numel()
    assert torch.equal(view, torch.arange(view.storage_offset(), view.storage_offset() + n).to(dtype))


def test_empty_hugepages_zero_size_and_bad_args():
    assert memory.empty_hugepages((0, 4), torch.float32).shape == (0, 4)
    with pytest.raises(ValueError, match="shape"):
        memory.empty_hugepages((2, -1), torch.float32)
    with pytest.raises(TypeError, match="shape"):
        memory.empty_hugepages((2, "x"), torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        memory.empty_hugepages((2, 2), "bf16")


def test_huge_pages_are_obtained_where_the_os_allows():
    mode = memory.thp_mode()
    if mode not in ("always", "madvise") or memory.hugepage_bytes() is None:
        pytest.skip(f"transparent huge pages unavailable here (mode {mode!r})")
    before = memory.hugepage_bytes()
    t = memory.empty_hugepages((16 << 20,), torch.uint8).fill_(1)  # first touch after madvise
    after = memory.hugepage_bytes()
    assert after - before >= 8 << 20, f"only {(after - before) >> 20} MiB of 16 MiB on huge pages"
    assert int(t[::4096].sum()) == (16 << 20) // 4096


def test_cache_tensor_rule(monkeypatch):
    big = memory.empty_cache_tensor((memory.HUGEPAGE_MIN_BYTES,), torch.uint8)
    small = memory.empty_cache_tensor((1024,), torch.uint8)
    assert big.data_ptr() % (2 << 20) == 0
    assert small.numel() == 1024
    monkeypatch.setenv("PYKERNELS_HUGEPAGES", "0")
    assert not memory.hugepages_enabled()
    off = memory.empty_cache_tensor((memory.HUGEPAGE_MIN_BYTES,), torch.uint8)
    assert off.numel() == memory.HUGEPAGE_MIN_BYTES and off.dtype == torch.uint8


def test_quantized_cache_on_huge_pages_is_exact_and_correct():
    # 2 x 4 MiB code pools: large enough for the huge-page rule; nbytes stays the sum of tensors
    c = pk.QuantizedKVCache(1, 16384, 8, 128, bits=4, group_size=32, residual=32)
    assert c.k_codes.data_ptr() % (2 << 20) == 0
    assert int(c.k_codes.abs().sum()) == 0 and int(c.k_scale.abs().sum()) == 0  # zeroed
    tensors = [c.k_codes, c.v_codes, c.k_scale, c.k_zero, c.v_scale, c.v_zero, c.fp_k, c.fp_v]
    assert c.nbytes >= sum(t.numel() * t.element_size() for t in tensors)
    k = torch.randn(1, 100, 8, 128, dtype=torch.bfloat16)
    v = torch.randn(1, 100, 8, 128, dtype=torch.bfloat16)
    c.append(k, v)
    q = torch.randn(1, 32, 128, dtype=torch.bfloat16)
    out = pk.decode_attention(q, c)
    ref = pk.decode_attention(q, c, backend="reference")
    assert (out.float() - ref.float()).abs().max() < 2e-2
