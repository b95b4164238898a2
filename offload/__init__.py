"""offload: stream a Llama-family model's weights from GPU / CPU / disk while decoding.

``load_model`` converts an HF safetensors checkpoint into a checksummed, page-aligned store
(once; resumable), decides with ``plan_placement`` (the ``roofline`` cost model and this
machine's measured bandwidths) which layers stay resident under the memory budgets and which
stream from disk, and returns an ``OffloadedModel`` whose ``generate`` / ``forward`` read the
streamed layers in background threads while the current layer computes.

Submodules load lazily, so ``import offload`` stays cheap.
"""
from importlib import import_module

__all__ = ["load_model", "OffloadedModel", "plan_placement", "Placement", "demo_checkpoint", "convert",
           "Store", "StoreError", "IncompleteStoreError", "CorruptPageError", "Checkpoint", "parse_bytes",
           "choose_prefill_chunk", "TieredKVCache"]

_WHERE = {
    "load_model": "model", "OffloadedModel": "model",
    "plan_placement": "placement", "Placement": "placement", "parse_bytes": "placement",
    "choose_prefill_chunk": "placement",
    "demo_checkpoint": "checkpoint", "Checkpoint": "checkpoint",
    "convert": "store", "Store": "store", "StoreError": "store", "IncompleteStoreError": "store",
    "CorruptPageError": "store",
    "TieredKVCache": "kvtier",
}


def __getattr__(name):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'offload' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
