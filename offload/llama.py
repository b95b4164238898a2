"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over weights handed in one layer at a time.

A streaming executor calls ``layer_forward(cfg, weights, h, positions, cache, layer, rope)`` with
``weights`` a plain dict of the layer's tensors (HF names without the ``model.layers.{i}.``
prefix). The tensors may be zero-copy views into I/O buffers that are reused once the call
returns: nothing here keeps a reference to a weight (the KV cache stores copies of K and V).

Math follows Hugging Face's ``LlamaForCausalLM`` (and ``MistralForCausalLM``,
``Qwen2ForCausalLM``) in the compute dtype, the dtype of the hidden state ``h``:

* RMSNorm in float32, cast back, times the weight (``LlamaRMSNorm``);
* RoPE with HF's ``rotate_half`` convention, cos/sin computed in float32 and cast to the
  compute dtype (``LlamaRotaryEmbedding``), default / linear / llama3 frequencies;
* attention: prefill with ``F.scaled_dot_product_attention`` (causal, GQA), decode (T == 1)
  with ``pykernels.decode_attention`` over a dense cache or a ``pykernels.QuantizedKVCache``;
* projections with ``F.linear`` (plain tensors) or ``pykernels.lut_gemv`` (``LUTWeight``);
* SwiGLU MLP; the residual stream stays in the compute dtype.

Example
-------
>>> cfg = LlamaConfig.from_hf(hf_model.config.to_dict())
>>> model = InMemoryLlama(cfg, hf_model.state_dict(), dtype=torch.bfloat16)
>>> cache = model.new_cache(batch=1, capacity=256)
>>> logits = model.forward(prompt_ids, cache)          # [1, T, V] float32
>>> logits = model.forward(logits[:, -1:].argmax(-1), cache)
"""
from __future__ import annotations

import functools

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels.memory import empty_cache_tensor

__all__ = ["LlamaConfig", "Rope", "KVCache", "rms_norm", "linear", "layer_forward", "embed", "final_logits",
           "InMemoryLlama", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def _require(cfg: dict, key: str):
    if cfg.get(key) is None:
        raise ValueError(f"{key}: missing from the config (required for model_type "
                         f"{cfg.get('model_type')!r})")
    return cfg[key]


def _rope_from_hf(cfg: dict, max_pos: int):
    """(rope_theta, rope_scaling) from an HF config dict. HF gives a legacy ``rope_scaling``
    priority over ``rope_parameters`` (transformers.modeling_rope_utils.convert_rope_params_to_dict)."""
    src = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rp = dict(cfg.get(src) or {})
    if rp and all(isinstance(v, dict) for v in rp.values()):
        raise ValueError(f"{src}: per-layer-type RoPE parameters ({sorted(rp)}) are not supported")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    theta = float(rp.get("rope_theta", cfg.get("rope_theta") or 10000.0))
    prf = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if prf is not None and float(prf) != 1.0:
        key = f"{src}.partial_rotary_factor" if "partial_rotary_factor" in rp else "partial_rotary_factor"
        raise ValueError(f"{key}: partial rotary embeddings are not supported, got {prf}")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        if rp.get("factor") is None:
            raise ValueError(f"{src}.factor: required for rope_type 'linear'")
        return theta, {"rope_type": "linear", "factor": float(rp["factor"])}
    if rope_type == "llama3":
        out = {"rope_type": "llama3"}
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            if rp.get(k) is None:
                raise ValueError(f"{src}.{k}: required for rope_type 'llama3'")
            out[k] = float(rp[k])
        # HF: a top-level original_max_position_embeddings wins, else the dict's, else max_position_embeddings
        omp = cfg.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings") or max_pos
        out["original_max_position_embeddings"] = int(omp)
        if out["high_freq_factor"] == out["low_freq_factor"]:
            raise ValueError(f"{src}.high_freq_factor: must differ from low_freq_factor, both {out['low_freq_factor']}")
        return theta, out
    raise ValueError(f"{src}: rope_type {rope_type!r} is not supported (supported: "
                     f"{', '.join(SUPPORTED_ROPE_TYPES)})")


_HF_DEFAULT_WINDOW = 4096  # transformers' MistralConfig and Qwen2Config default sliding_window


def _sliding_from_hf(cfg: dict, model_type: str, num_layers: int):
    """The attention window W where HF would apply one on some layer, else None."""
    # a config.json without the key gets HF's class default (MistralConfig / Qwen2Config: 4096);
    # an explicit null means no window
    sw = cfg.get("sliding_window", _HF_DEFAULT_WINDOW)
    if model_type == "mistral":
        return int(sw) if sw else None
    if model_type == "qwen2":
        if not cfg.get("use_sliding_window") or not sw:
            return None
        types = cfg.get("layer_types")
        if types is None:
            mwl = cfg.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(num_layers)]
        return int(sw) if "sliding_attention" in types else None
    return None


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder.

    ``attention_bias``: q/k/v projections have biases (Qwen2; Llama with ``attention_bias``).
    ``o_proj_bias``: o_proj has a bias (Llama with ``attention_bias``; not Qwen2).
    ``mlp_bias``: gate/up/down have biases (Llama ``mlp_bias``).
    ``sliding_window``: the window of Mistral / Qwen2 sliding-window attention where HF applies
    one, else None. Attention over at most W tokens equals full attention, so a sequence may
    grow up to W tokens; longer raises ValueError (the windowed mask is not implemented).
    ``rope_scaling``: None, {"rope_type": "linear", "factor"} or {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    """
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    model_type: str
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "max_position_embeddings"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}: expected a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 8:  # (also even, as RoPE needs)
            raise ValueError(f"head_dim: the decode-attention kernels need a multiple of 8, got {self.head_dim}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type: expected one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From an HF ``config.json`` dict (or ``PretrainedConfig.to_dict()``), transformers 4 or 5
        spelling (``rope_scaling`` / ``rope_theta`` or ``rope_parameters``).

        Raises ValueError naming the key for anything this runtime does not compute the way
        HF does: another model_type, hidden_act other than silu, RoPE types other than
        default / linear / llama3, partial rotary factors, per-layer RoPE."""
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg: expected a dict (config.json), got {type(cfg).__name__}")
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type: expected one of {SUPPORTED_MODEL_TYPES}, got {mt!r}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act: only 'silu' (SwiGLU) is supported, got {act!r}")
        hidden = int(_require(cfg, "hidden_size"))
        heads = int(_require(cfg, "num_attention_heads"))
        layers = int(_require(cfg, "num_hidden_layers"))
        kv = cfg.get("num_key_value_heads") or heads
        max_pos = int(_require(cfg, "max_position_embeddings"))
        theta, scaling = _rope_from_hf(cfg, max_pos)
        if mt == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif mt == "llama":
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
            mlp_bias = bool(cfg.get("mlp_bias", False))
        else:
            qkv_bias = o_bias = mlp_bias = False
        return cls(
            hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=int(kv),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(_require(cfg, "intermediate_size")),
            vocab_size=int(_require(cfg, "vocab_size")),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), attention_bias=qkv_bias,
            max_position_embeddings=max_pos, model_type=mt, o_proj_bias=o_bias, mlp_bias=mlp_bias,
            sliding_window=_sliding_from_hf(cfg, mt, layers))

    def layer_weight_shapes(self) -> dict:
        """{name: shape} of one layer's weights, HF names without the ``model.layers.{i}.`` prefix."""
        H, D, I = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * D, self.num_kv_heads * D
        s = {"input_layernorm.weight": (H,)}
        for name, n, k, bias in (("self_attn.q_proj", q, H, self.attention_bias),
                                 ("self_attn.k_proj", kv, H, self.attention_bias),
                                 ("self_attn.v_proj", kv, H, self.attention_bias),
                                 ("self_attn.o_proj", H, q, self.o_proj_bias)):
            s[name + ".weight"] = (n, k)
            if bias:
                s[name + ".bias"] = (n,)
        s["post_attention_layernorm.weight"] = (H,)
        for name, n, k in (("mlp.gate_proj", I, H), ("mlp.up_proj", I, H), ("mlp.down_proj", H, I)):
            s[name + ".weight"] = (n, k)
            if self.mlp_bias:
                s[name + ".bias"] = (n,)
        return s

    def layer_weight_names(self) -> list[str]:
        """HF names of one layer's weights without the ``model.layers.{i}.`` prefix."""
        return list(self.layer_weight_shapes())

    def layer_nbytes(self, dtype=torch.bfloat16) -> int:
        """Bytes of one layer's weights stored densely in ``dtype``."""
        es = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(s) for s in self.layer_weight_shapes().values()) * es


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """float32 [head_dim / 2] inverse frequencies, the same float32 operations as HF's
    ``_compute_default_rope_parameters`` / ``_compute_linear_scaling_rope_parameters`` /
    ``_compute_llama3_parameters``."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs["rope_type"] == "linear":
        return inv / rs["factor"]
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    inv_l = torch.where(wl > low_wl, inv / factor, inv)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wl < high_wl) * ~(wl > low_wl)
    return torch.where(medium, smoothed, inv_l)


class Rope:
    """cos/sin tables [max_positions, head_dim] (HF layout: the D/2 frequencies twice).

    Tables are computed in float32 (positions times the float32 inverse frequencies, as HF
    does) and stored in ``dtype``; ``apply`` casts them to x's dtype, as HF does. The tables grow
    on demand when ``apply`` is given an int start beyond them.
    """

    def __init__(self, cfg: LlamaConfig, max_positions: int, dtype=torch.float32, device="cpu"):
        if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
            raise ValueError(f"max_positions: expected a positive int, got {max_positions!r}")
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.inv_freq = rope_inv_freq(cfg)
        self.cos = self.sin = None
        self._build(max_positions)

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def _build(self, n: int):
        pos = torch.arange(n, dtype=torch.int64).float()
        freqs = pos[:, None] * self.inv_freq[None, :]          # [n, D/2] float32
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.device, self.dtype)
        self.sin = emb.sin().to(self.device, self.dtype)

    def tables(self, positions, T: int, dtype):
        """(cos, sin) [T, D] in ``dtype`` for an int start or a position tensor [T]."""
        if isinstance(positions, int) and not isinstance(positions, bool):
            if positions < 0:
                raise ValueError(f"positions: expected a start >= 0, got {positions}")
            if positions + T > self.max_positions:
                self._build(max(positions + T, 2 * self.max_positions))
            cos, sin = self.cos[positions:positions + T], self.sin[positions:positions + T]
        elif isinstance(positions, torch.Tensor):
            if positions.dim() != 1 or positions.shape[0] != T:
                raise ValueError(f"positions: expected an int tensor [{T}] (one position per token), "
                                 f"got shape {tuple(positions.shape)}")
            if positions.dtype.is_floating_point or positions.dtype == torch.bool:
                raise TypeError(f"positions: expected an integer tensor, got {positions.dtype}")
            if positions.device.type == "cpu":  # bounds check without a device sync
                hi = int(positions.max())
                if int(positions.min()) < 0:
                    raise ValueError("positions: negative position")
                if hi >= self.max_positions:
                    self._build(max(hi + 1, 2 * self.max_positions))
            idx = positions.to(self.device)
            cos, sin = self.cos[idx], self.sin[idx]
        else:
            raise TypeError(f"positions: expected an int start or an int tensor [T], got {type(positions).__name__}")
        return cos.to(dtype), sin.to(dtype)

    def apply(self, x: torch.Tensor, positions) -> torch.Tensor:
        """Rotate x [B, T, H, D] at ``positions`` (int tensor [T], the same for all rows, or an
        int start: positions start .. start + T - 1): ``x cos + rotate_half(x) sin`` in x's dtype."""
        if x.dim() != 4 or x.shape[-1] != self.cfg.head_dim:
            raise ValueError(f"x: expected [B, T, H, {self.cfg.head_dim}], got shape {tuple(x.shape)}")
        cos, sin = self.tables(positions, x.shape[1], x.dtype)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        return (x * cos) + (rot * sin)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
#: Prefill attention takes its queries this many at a time: the scores it holds are bounded by
#: QUERY_BLOCK x keys per head, whatever the chunk length.
QUERY_BLOCK = 64


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    r"""HF ``LlamaRMSNorm``: :math:`w \cdot \mathrm{cast}(x / \sqrt{\mathrm{mean}(x^2) + \epsilon})`,
    the normalisation in float32, the product in x's dtype. x [..., H], weight [H] -> [..., H]."""
    dt = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(dt) * xf.to(dt)


def linear(x: torch.Tensor, w, bias=None, *, lut_mode: str = "int8") -> torch.Tensor:
    """y = x @ W^T (+ bias) in x's dtype. x [..., K]; w a Tensor [N, K] (``F.linear``; cast to
    x's dtype when it differs) or a ``pk.LUTWeight`` (``pk.lut_gemv`` on x as [M, K]; it splits
    M > 16 rows itself; ``lut_mode`` "int8" or "exact", see its docstring) -> [..., N]."""
    if isinstance(w, pk.LUTWeight):
        N, K = w.shape
        y = pk.lut_gemv(x.reshape(-1, K), w, mode=lut_mode).reshape(*x.shape[:-1], N)
        return y if bias is None else y + bias.to(y.dtype)
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and 0 < x.numel() <= _GEMV_MAX_ROWS * x.shape[-1]
            and w.dim() == 2 and w.stride(-1) == 1 and (w.shape[0] == 1 or w.stride(0) >= w.shape[1])
            and _cpu_gemv() is not None):
        # decode: a memory-bound GEMV; pykernels.gemv streams bf16 weights 1.2-2.6x faster than
        # torch's F.linear here (cold weights, M = 1); prefill rows stay on F.linear (compute-bound)
        N, K = w.shape
        return _cpu_gemv()(x.reshape(-1, K), w, bias).reshape(*x.shape[:-1], N)
    return F.linear(x, w, bias)


_GEMV_MAX_ROWS = 2  # rows of x up to which the GEMV beats F.linear (measured; about equal at 4)


@functools.lru_cache(maxsize=None)
def _cpu_gemv():
    """pykernels.gemv.gemv when the C++ CPU extension is built, else None (then torch's F.linear,
    the standard path, not a reference fallback)."""
    from pykernels import backends
    if not backends.REGISTRY["cpu"].status()[0]:  # the CPU probe only (status() imports cupy/triton)
        return None
    from pykernels.gemv import gemv
    return gemv


def embed(table: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Rows of the embedding table [V, hidden] for input_ids [B, T] -> [B, T, hidden] (table dtype)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected an int tensor [B, T], got {got}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    if input_ids.device.type == "cpu" and input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= table.shape[0]:
            raise ValueError(f"input_ids: token ids must be in [0, {table.shape[0]}) (vocab), got [{lo}, {hi}]")
    return F.embedding(input_ids.to(table.device), table)


def final_logits(cfg: LlamaConfig, norm_weight, lm_head, h: torch.Tensor, *, lut_mode: str = "int8") -> torch.Tensor:
    """``model.norm`` then ``lm_head``: h [B, T, hidden] -> float32 logits [B, T, V] (the matmul
    in h's dtype, as HF). Pass ``h[:, -1:]`` when only the next token is wanted."""
    return linear(rms_norm(h, norm_weight, cfg.rms_norm_eps), lm_head, lut_mode=lut_mode).float()


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------
def check_append(cache, layer, q, k, v, T_expected=None) -> int:
    """Checks of one layer's append of T tokens to a cache of the ``KVCache`` protocol (``cfg``,
    ``batch``, ``length``, ``capacity``, ``_pending``): the layer index, q [B, T, Hq, D] (or
    None: T from k), k and v [B, T, Hkv, D], T (>= 1, or ``T_expected``), one append per layer
    per forward, capacity and the sliding window. -> T; ValueError naming the argument."""
    cfg = cache.cfg
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cfg.num_layers:
        raise ValueError(f"layer: expected an int in [0, {cfg.num_layers}), got {layer!r}")
    B, D = cache.batch, cfg.head_dim
    if q is not None and (q.dim() != 4 or q.shape[0] != B or q.shape[2] != cfg.num_heads or q.shape[3] != D):
        raise ValueError(f"q: expected [{B}, T, {cfg.num_heads}, {D}], got {tuple(q.shape)}")
    first, T = ("q", q.shape[1]) if q is not None else ("k", k.shape[1] if k.dim() == 4 else -1)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (B, T, cfg.num_kv_heads, D):
            raise ValueError(f"{name}: expected [{B}, {T}, {cfg.num_kv_heads}, {D}], got {tuple(t.shape)}")
    if T < 1 or (T_expected is not None and T != T_expected):
        raise ValueError(f"{first}: expected T == {T_expected or '>= 1'} tokens, got {T}")
    if cache._pending[layer]:
        raise ValueError(f"layer: layer {layer} already appended {cache._pending[layer]} tokens at length "
                         f"{cache.length}; call advance() after every layer has run")
    need = cache.length + T
    if need > cache.capacity:
        raise ValueError(f"capacity: the cache holds {cache.length} tokens; {T} more need length {need} > "
                         f"capacity {cache.capacity}")
    if cfg.sliding_window is not None and need > cfg.sliding_window:
        raise ValueError(f"sliding_window: length {need} exceeds the {cfg.model_type} attention window "
                         f"{cfg.sliding_window}; windowed attention is not implemented (full attention "
                         "equals it only up to the window)")
    return T


class KVCache:
    """Per-layer K and V of a batch of B sequences that advance together.

    Dense (``kv_bits=None``): one tensor [num_layers, 2, B, capacity, Hkv, D] in ``dtype``;
    decode reads it with ``pk.decode_attention(q, k, v, seqlens)``. Quantized (``kv_bits`` 8 / 4 /
    2 / "fp8"): one ``pk.QuantizedKVCache`` per layer (``group_size`` in 32 / 64 / 128,
    ``residual`` a multiple of it, ``dtype`` of its full-precision rows).

    Protocol: in each forward every layer appends the same T tokens (``prefill_attend`` or
    ``decode_attend``), then ``advance(T)`` commits them; ``length`` is the tokens committed.
    A call rejected by its checks (shapes, capacity, window) appends nothing.
    """

    def __init__(self, cfg: LlamaConfig, batch: int, capacity: int, *, dtype=torch.bfloat16, kv_bits=None,
                 group_size: int = 32, residual: int = 128, device="cpu"):
        for name, v in (("batch", batch), ("capacity", capacity)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
        self.cfg, self.batch, self.capacity, self.dtype = cfg, batch, capacity, dtype
        self.kv_bits, self.device = kv_bits, torch.device(device)
        self.length = 0
        self._pending = [0] * cfg.num_layers   # tokens appended by each layer since the last advance
        self._broken = None                     # set by discard_pending on a quantized cache
        L, Hkv, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        with torch.inference_mode(False):  # usable inside and outside inference mode alike
            if kv_bits is None:
                self._kv = empty_cache_tensor((L, 2, batch, capacity, Hkv, D), dtype, self.device).zero_()
                self._q = None
            else:
                self._kv = None
                self._q = [pk.QuantizedKVCache(batch, capacity, Hkv, D, bits=kv_bits, group_size=group_size,
                                               residual=residual, dtype=dtype, device=self.device)
                           for _ in range(L)]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for K and V (all layers; quantized: codes, scales, fp rows, counters)."""
        if self._q is None:
            return self._kv.numel() * self._kv.element_size()
        return sum(c.nbytes for c in self._q)

    def layer_cache(self, layer: int):
        """The storage of one layer: (k, v) dense tensors [B, capacity, Hkv, D], or its
        ``pk.QuantizedKVCache``."""
        return (self._kv[layer, 0], self._kv[layer, 1]) if self._q is None else self._q[layer]

    def dequantize(self, layer: int):
        """(k, v) float32 [B, n, Hkv, D] of the n tokens layer ``layer`` holds (committed and
        pending): exactly what its attention reads."""
        n = self.length + self._pending[layer]
        if self._q is None:
            return self._kv[layer, 0, :, :n].float(), self._kv[layer, 1, :, :n].float()
        return self._q[layer].dequantize()

    def _reserve(self, layer, q, k, v, T_expected=None):
        if self._broken:
            raise RuntimeError(self._broken)
        return check_append(self, layer, q, k, v, T_expected)

    @torch.no_grad()
    def prefill_attend(self, layer: int, q, k, v) -> torch.Tensor:
        """Append k, v [B, T, Hkv, D] (roped) after the ``length`` held tokens and return the
        causal attention of q [B, T, Hq, D] over all ``length + T``: query i sees the old
        tokens and new tokens 0..i. -> [B, T, Hq, D] in q's dtype.

        Dense: attends over the cache rows (new tokens as stored, in the cache dtype).
        Quantized: the new tokens in full precision (cast to ``dtype``), the old ones as the
        cache holds them after this append (``QuantizedKVCache.dequantize``)."""
        T = self._reserve(layer, q, k, v)
        L0, S = self.length, self.length + T
        if self._q is None:
            kc, vc = self._kv[layer, 0], self._kv[layer, 1]
            kc[:, L0:S] = k
            vc[:, L0:S] = v
            self._pending[layer] = T
            K, V = kc[:, :S], vc[:, :S]
        else:
            c = self._q[layer]
            c.append(k, v)  # validates everything before writing: a rejected append changes nothing
            self._pending[layer] = T
            K, V = k.to(self.dtype), v.to(self.dtype)
            if L0:
                dk, dv = c.dequantize()
                K = torch.cat((dk[:, :L0].to(self.dtype), K), dim=1)
                V = torch.cat((dv[:, :L0].to(self.dtype), V), dim=1)
        dt = q.dtype
        qt, Kt, Vt = q.transpose(1, 2), K.to(dt).transpose(1, 2), V.to(dt).transpose(1, 2)  # [B, H, T|S, D]
        gqa = self.cfg.num_heads != self.cfg.num_kv_heads
        if L0 == 0 and T <= QUERY_BLOCK:
            o = F.scaled_dot_product_attention(qt, Kt, Vt, is_causal=True, enable_gqa=gqa)
            return o.transpose(1, 2).contiguous()
        # QUERY_BLOCK queries at a time, bottom-right aligned causal mask: query i sits at
        # position L0 + i and sees the keys up to it
        out = q.new_empty(q.shape)
        for a in range(0, T, QUERY_BLOCK):
            b = min(T, a + QUERY_BLOCK)
            n = L0 + b
            mask = (torch.arange(n, device=q.device)[None, :]
                    <= (L0 + torch.arange(a, b, device=q.device))[:, None])
            o = F.scaled_dot_product_attention(qt[:, :, a:b], Kt[:, :, :n], Vt[:, :, :n], attn_mask=mask,
                                               enable_gqa=gqa)
            out[:, a:b] = o.transpose(1, 2)
        return out

    @torch.no_grad()
    def decode_attend(self, layer: int, q, k, v) -> torch.Tensor:
        """One new token (T == 1): append k, v [B, 1, Hkv, D], then ``pk.decode_attention`` of
        q [B, 1, Hq, D] over the ``length + 1`` tokens. -> [B, 1, Hq, D] in q's dtype."""
        self._reserve(layer, q, k, v, T_expected=1)
        L0 = self.length
        if self._q is None:
            kc, vc = self._kv[layer, 0], self._kv[layer, 1]
            kc[:, L0] = k[:, 0]
            vc[:, L0] = v[:, 0]
            self._pending[layer] = 1
            seqlens = torch.full((self.batch,), L0 + 1, dtype=torch.int32, device=self.device)
            o = pk.decode_attention(q[:, 0], kc, vc, seqlens)
        else:
            c = self._q[layer]
            c.append(k, v)
            self._pending[layer] = 1
            o = pk.decode_attention(q[:, 0], c)
        return o[:, None]

    def discard_pending(self) -> None:
        """Forget what layers appended since the last ``advance`` (a forward that failed
        part-way). A dense cache just ignores those rows; a quantized cache cannot un-append, so
        it is marked unusable and every later call raises (never silently misaligned)."""
        if any(self._pending) and self._q is not None:
            self._broken = ("the cache is unusable: a forward failed after some layers appended to the "
                            "quantized cache, which cannot roll back; start a new cache")
        self._pending = [0] * self.cfg.num_layers

    def advance(self, T: int):
        """Commit the T tokens every layer has appended in this forward."""
        bad = [i for i, p in enumerate(self._pending) if p != T]
        if bad:
            i = bad[0]
            raise ValueError(f"T: advance({T}) but layer {i} appended {self._pending[i]} tokens in this forward "
                             "(every layer must append the same T tokens first)")
        self.length += T
        self._pending = [0] * self.cfg.num_layers

    def __repr__(self):
        kind = "dense" if self.kv_bits is None else f"kv_bits={self.kv_bits!r}"
        return (f"KVCache({kind}, batch={self.batch}, capacity={self.capacity}, length={self.length}, "
                f"dtype={self.dtype}, nbytes={self.nbytes})")


# --------------------------------------------------------------------------------------------
# one decoder layer
# --------------------------------------------------------------------------------------------
def check_layer_weights(cfg: LlamaConfig, weights: dict):
    """ValueError naming the weight for a missing, unexpected or mis-shaped entry (shapes only;
    a LUTWeight is checked by its logical shape (N, K))."""
    if not isinstance(weights, dict):
        raise TypeError(f"weights: expected a dict of tensors, got {type(weights).__name__}")
    shapes = cfg.layer_weight_shapes()
    for name, shape in shapes.items():
        w = weights.get(name)
        if w is None:
            raise ValueError(f"weights: missing {name!r} (expected shape {shape})")
        if isinstance(w, pk.LUTWeight):
            if name.endswith(".bias") or len(shape) != 2:
                raise ValueError(f"{name}: a LUTWeight is only accepted for projection weights")
            got = tuple(w.shape)
        elif isinstance(w, torch.Tensor):
            got = tuple(w.shape)
            if not w.dtype.is_floating_point:
                raise TypeError(f"{name}: expected a float tensor, got {w.dtype}")
        else:
            raise TypeError(f"{name}: expected a torch.Tensor or pk.LUTWeight, got {type(w).__name__}")
        if got != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {got}")
    if len(weights) != len(shapes):
        extra = sorted(set(weights) - set(shapes))
        raise ValueError(f"weights: unexpected {extra[0]!r} for this {cfg.model_type} config "
                         f"(expected exactly {sorted(shapes)})")


@torch.no_grad()
def layer_forward(cfg: LlamaConfig, weights: dict, h: torch.Tensor, positions, cache: KVCache, layer: int,
                  rope: Rope, *, lut_mode: str = "int8", fused: dict | None = None) -> torch.Tensor:
    """One decoder layer: ``h + attn(norm(h))``, then ``+ mlp(norm(.))``, in h's dtype.

    Parameters
    ----------
    h : [B, T, hidden] float32 / float16 / bfloat16 (the compute dtype).
    positions : int tensor [T] or an int start (positions start .. start + T - 1); normally
        ``cache.length``.
    weights : {name: Tensor or pk.LUTWeight} as ``cfg.layer_weight_names()``; read during the
        call only (no reference is kept, so they may be views of a reusable buffer).
    cache : appends this layer's T new K/V tokens; T == 1 takes the decode kernel.
    fused : optional {"qkv": [Hq*D + 2*Hkv*D, hidden], "gate_up": [2*intermediate, hidden]}
        dense matrices equal to the row-wise concatenation of q/k/v and gate/up (zero-copy views
        where the store keeps those weights adjacent): one GEMV instead of three / two.

    Returns the new h [B, T, hidden] (a fresh tensor).
    """
    if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[-1] != cfg.hidden_size:
        raise ValueError(f"h: expected [B, T, {cfg.hidden_size}], got "
                         f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"h: expected float32, float16 or bfloat16, got {h.dtype}")
    if h.shape[0] != cache.batch:
        raise ValueError(f"h: batch {h.shape[0]} differs from the cache batch {cache.batch}")
    check_layer_weights(cfg, weights)
    w, eps = weights, cfg.rms_norm_eps
    B, T, _ = h.shape
    D = cfg.head_dim

    def proj(x, name):
        return linear(x, w[name + ".weight"], w.get(name + ".bias"), lut_mode=lut_mode)

    fused = fused or {}
    nq, nkv = cfg.num_heads * D, cfg.num_kv_heads * D
    for key, rows in (("qkv", nq + 2 * nkv), ("gate_up", 2 * cfg.intermediate_size)):
        f = fused.get(key)
        if f is not None and (not isinstance(f, torch.Tensor) or tuple(f.shape) != (rows, cfg.hidden_size)):
            raise ValueError(f"fused: {key!r} expected a tensor [{rows}, {cfg.hidden_size}], got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
    x = rms_norm(h, w["input_layernorm.weight"], eps)
    qkv_bias = any(f"self_attn.{p}_proj.bias" in w for p in "qkv")
    if "qkv" in fused and not qkv_bias:  # with biases: separate projections, one rounding each as HF
        qkv = linear(x, fused["qkv"])
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
        q = q.reshape(B, T, cfg.num_heads, D)
        k = k.reshape(B, T, cfg.num_kv_heads, D)
        v = v.reshape(B, T, cfg.num_kv_heads, D)
    else:
        q = proj(x, "self_attn.q_proj").view(B, T, cfg.num_heads, D)
        k = proj(x, "self_attn.k_proj").view(B, T, cfg.num_kv_heads, D)
        v = proj(x, "self_attn.v_proj").view(B, T, cfg.num_kv_heads, D)
    q, k = rope.apply(q, positions), rope.apply(k, positions)
    attend = cache.decode_attend if T == 1 else cache.prefill_attend
    a = attend(layer, q, k, v)                                   # [B, T, Hq, D]
    h = h + proj(a.reshape(B, T, cfg.num_heads * D), "self_attn.o_proj")
    x = rms_norm(h, w["post_attention_layernorm.weight"], eps)
    if "gate_up" in fused and "mlp.gate_proj.bias" not in w:
        gu = linear(x, fused["gate_up"])
        F_ = cfg.intermediate_size
        m = F.silu(gu[..., :F_]) * gu[..., F_:]
    else:
        m = F.silu(proj(x, "mlp.gate_proj")) * proj(x, "mlp.up_proj")
    return h + proj(m, "mlp.down_proj")


# --------------------------------------------------------------------------------------------
# whole model in memory (convenience and test vehicle)
# --------------------------------------------------------------------------------------------
class InMemoryLlama:
    """Every weight resident; ``forward`` runs ``layer_forward`` over all layers.

    ``state_dict`` uses HF names (``model.embed_tokens.weight``, ``model.layers.{i}.*``,
    ``model.norm.weight``, ``lm_head.weight``); projection weights may be ``pk.LUTWeight``.
    Tensors are converted to ``dtype`` (the compute dtype) on ``device``.
    """

    def __init__(self, cfg: LlamaConfig, state_dict: dict, *, dtype=torch.float32, kv_bits=None,
                 kv_group_size: int = 32, kv_residual: int = 128, lut_mode: str = "int8", device="cpu"):
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.kv_bits, self.kv_group_size, self.kv_residual = kv_bits, kv_group_size, kv_residual
        self.lut_mode = lut_mode
        sd = dict(state_dict)

        def take(key):
            if key not in sd:
                raise ValueError(f"state_dict: missing {key!r}")
            t = sd.pop(key)
            if isinstance(t, pk.LUTWeight):
                return t.to(self.device)
            return t.detach().to(self.device, dtype)

        self.embed_tokens = take("model.embed_tokens.weight")
        names = cfg.layer_weight_names()
        self.layers = [{n: take(f"model.layers.{i}.{n}") for n in names} for i in range(cfg.num_layers)]
        for i, w in enumerate(self.layers):
            try:
                check_layer_weights(cfg, w)
            except ValueError as e:
                raise ValueError(f"model.layers.{i}.{e}") from None
        self.norm = take("model.norm.weight")
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = take("lm_head.weight")
        extra = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
        if extra:
            raise ValueError(f"state_dict: unexpected {extra[0]!r} for this {cfg.model_type} config")
        self.rope = Rope(cfg, min(cfg.max_position_embeddings, 2048), device=self.device)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """A KVCache in the model's dtype (and kv_bits / group size / residual)."""
        return KVCache(self.cfg, batch, capacity, dtype=self.dtype, kv_bits=self.kv_bits,
                       group_size=self.kv_group_size, residual=self.kv_residual, device=self.device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, *, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] at positions ``cache.length .. + T - 1`` -> float32 logits [B, T, V]
        ([B, 1, V] with ``last_only``); the cache advances by T."""
        h = embed(self.embed_tokens, input_ids).to(self.dtype)
        if h.shape[0] != cache.batch:
            raise ValueError(f"input_ids: batch {h.shape[0]} differs from the cache batch {cache.batch}")
        start, T = cache.length, h.shape[1]
        for i, w in enumerate(self.layers):
            h = layer_forward(self.cfg, w, h, start, cache, i, self.rope, lut_mode=self.lut_mode)
        cache.advance(T)
        if last_only:
            h = h[:, -1:]
        return final_logits(self.cfg, self.norm, self.lm_head, h, lut_mode=self.lut_mode)

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, cache: KVCache | None = None) -> torch.Tensor:
        """Greedy decoding: input_ids [B, T] -> [B, T + max_new_tokens]."""
        B, T = input_ids.shape
        if cache is None:
            cache = self.new_cache(B, T + max_new_tokens)
        out = [input_ids]
        logits = self.forward(input_ids, cache, last_only=True)
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True).to(input_ids.dtype)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self.forward(nxt, cache)
        return torch.cat(out, dim=1)
