"""The generic language model: embed -> n_layers × block(mixer, mlp) -> norm -> head.

    model = LanguageModel(vocab_size=256, d_model=128, n_layers=4, mixer="mha",
                          mixer_kwargs={"mha": {"num_heads": 4}})
    params = model.init(rng, tokens)["params"]
    logits, _ = model.apply({"params": params}, tokens)             # [B, T, Vo] float32
    cache = model.init_cache(batch_size, max_len)
    logits, cache = model.apply({"params": params}, tokens, cache=cache)  # prefill / step

A block is pre-norm residual: `x + mixer(norm(x))`, then `x + mlp(norm(x))` (skipped for
`mlp="none"`, as Mamba-style stacks have it). Mixers come from `seqmix.registry` by name;
the model holds nothing mixer-specific.

Positions and packing (the house convention): `positions` [B, T] are absolute token positions
given by the caller. With packed documents (`segment_ids`) the caller passes positions that
restart at 0 in every document; the model never derives them from segment ids. When
`positions` is None they are `arange(T)` for a parallel forward; when decoding with a cache and
`pos_embedding="learned"` they must be given (the model does not count tokens), while mixers
fall back to their own cache-based defaults.

Init (GPT-2 style): embeddings normal(`embed_init_scale`), MLP and untied head normal(`init_std`);
`residual_init_scaling=True` scales the MLP output projections by 1/sqrt(2·n_layers) (GPT-2).
Mixers own the init of their own projections (they receive `layer_idx` and `n_layers`).

Shared blocks: a layer named "shared:<mixer>" (in a spec, "mamba,shared:mha", or a registered
pattern such as zamba) is one block, `params["shared_<mixer>"]` (its norms, mixer and MLP), that
every "shared:<mixer>" layer applies: one set of parameters, its layer_idx that of its first
application, and one cache per application (each application sees its own input stream).
`shared_mlp` gives shared blocks their own MLP choice (Zamba: Mamba blocks without an MLP, the
shared attention block with one).

scan_layers: the blocks run under `nn.scan` with parameters stacked on a leading layer axis
(`params["blocks"]`, each leaf [n_layers, ...]); unscanned, they are `params["block_<i>"]`.
`stack_block_params` / `unstack_block_params` convert one layout into the other. Every scanned
layer is built with `layer_idx=0`, so scan_layers needs one mixer for the whole stack (an error
says so otherwise) and mixers whose forward does not depend on `layer_idx` (init may: the
scanned init simply uses layer 0's).
"""

import dataclasses
import difflib
import math
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.common import mlp as mlp_lib
from seqmix.mixers.common import rwkv_channel_mix
from seqmix.mixers.common import norms
from seqmix.mixers.common import peer
from seqmix.mixers.common import pkm
from seqmix.models import embed as embed_lib
from seqmix.parallel import axes
from seqmix.positional import learned

NO_MIXER = "none"  # `mixer="none"`: blocks without token mixing (the ablation / control model)

# The one place MLP names are resolved. A stateful MLP (RWKV's channel mix) sets a class
# attribute `stateful = True`, takes `cache=` and returns `(y, cache)`, and implements
# `init_cache(batch_size, max_len, dtype)`; the block then keeps its cache in `BlockCache.mlp`.
# A stateful MLP also gets d_model, layer_idx and n_layers, the block's segment ids, and keeps
# its own initialisation (RWKV's depth-dependent token-shift mix, orthogonal/zero kernels).
MLPS: dict[str, type] = {"swiglu": mlp_lib.SwiGLU, "gelu": mlp_lib.GeluMLP,
                         "gelu_tanh": mlp_lib.GeluTanhMLP, "geglu": mlp_lib.GeGLU,
                         "rwkv_channel_mix": rwkv_channel_mix.RWKVChannelMix,
                         "pkm": pkm.ProductKeyMemory, "peer": peer.PEER}
# Hidden width M = round(mlp_ratio · d_model) when mlp_ratio is None: GPT-2's 4 for GELU, and
# 8/3 for SwiGLU (its three matrices then hold as many parameters as GELU's two at 4); RWKV-6's
# channel mix: int(3.5 · D) rounded down to a multiple of 32 (`rwkv_hidden`). PKM / PEER read
# hidden as the wanted number of memory slots / single-neuron experts (rounded up to a square).
DEFAULT_MLP_RATIO = {"swiglu": 8 / 3, "geglu": 8 / 3, "gelu": 4.0, "gelu_tanh": 4.0,
                     "pkm": 4.0, "peer": 4.0}

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing, recompute the block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
}

# Fields the model passes to every mixer itself (not settable through mixer_kwargs).
_MODEL_OWNED = ("d_model", "layer_idx", "n_layers", "dtype", "param_dtype", "parent", "name")


def _freeze(x):
  if isinstance(x, dict) or hasattr(x, "items"):
    return flax.core.FrozenDict({k: _freeze(v) for k, v in x.items()})
  if isinstance(x, (list, tuple)):
    return tuple(_freeze(v) for v in x)
  return x


class BlockCache(NamedTuple):
  """Decoding state of one block: the mixer's cache and, for a stateful MLP, the MLP's."""
  mixer: Any
  mlp: Any = None


def mixer_fields(name: str) -> list[str]:
  """The hyperparameters a registered mixer accepts through `mixer_kwargs[name]`."""
  cls = registry.get(name).cls
  return [f.name for f in dataclasses.fields(cls) if f.name not in _MODEL_OWNED]


def _check_mixer_kwargs(name: str, kwargs) -> None:
  valid = mixer_fields(name)
  for key in kwargs:
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      owned = (f" ({key!r} is set by the model for every mixer; set it on LanguageModel.)"
               if key in _MODEL_OWNED else "")
      raise ValueError(f"mixer_kwargs[{name!r}] has unknown field {key!r}.{hint}{owned} "
                       f"Fields of mixer {name!r}: {', '.join(valid)}.")


class Block(nn.Module):
  """x [B, T, D] -> x + mixer(norm(x)) -> + mlp(norm(x)).  Returns (x, BlockCache | None).

  The call signature (x, cache, segment_ids, positions) is positional so the block can be
  wrapped by `nn.remat` and `nn.scan` alike; `deterministic` is a field for the same reason.
  """
  d_model: int
  mixer_name: str
  mixer_kwargs: Any
  layer_idx: int
  n_layers: int
  mlp: str
  mlp_hidden: int
  norm: str
  norm_eps: float
  use_bias: bool
  dropout: float
  deterministic: bool
  init_std: float
  mlp_out_std: float
  dtype: Any
  param_dtype: Any

  def _norm(self, name):
    return norms.make_norm(self.norm, eps=self.norm_eps, use_bias=self.use_bias,
                           dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, cache=None, segment_ids=None, positions=None):
    new_mixer_cache = new_mlp_cache = None
    if self.mixer_name != NO_MIXER:
      mixer = registry.get(self.mixer_name).cls(
          d_model=self.d_model, layer_idx=self.layer_idx, n_layers=self.n_layers,
          dtype=self.dtype, param_dtype=self.param_dtype, name="mixer",
          **dict(self.mixer_kwargs))
      y, new_mixer_cache = mixer(self._norm("norm_mixer")(x), segment_ids=segment_ids,
                                 positions=positions,
                                 cache=None if cache is None else cache.mixer,
                                 deterministic=self.deterministic)
      x = x + nn.Dropout(self.dropout)(y.astype(x.dtype), deterministic=self.deterministic)
    if self.mlp != "none":
      cls = MLPS[self.mlp]
      common = dict(hidden=self.mlp_hidden, use_bias=self.use_bias, dropout=self.dropout,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")
      h = self._norm("norm_mlp")(x)
      if getattr(cls, "stateful", False):
        mlp = cls(d_model=self.d_model, layer_idx=self.layer_idx, n_layers=self.n_layers,
                  **common)
        y, new_mlp_cache = mlp(h, segment_ids=segment_ids,
                               cache=None if cache is None else cache.mlp,
                               deterministic=self.deterministic)
      else:
        mlp = cls(kernel_init=nn.initializers.normal(self.init_std),
                  out_init=nn.initializers.normal(self.mlp_out_std), **common)
        y = mlp(h, deterministic=self.deterministic)
      x = x + y.astype(x.dtype)
    return x, (None if cache is None else BlockCache(new_mixer_cache, new_mlp_cache))


class LanguageModel(nn.Module):
  """Decoder-only LM over any registered mixer(s).

  vocab_size: Vo. d_model: width D. n_layers: number of blocks.
  mixer: a registry name ("mha"), a registered pattern ("griffin"), a comma-separated
    pattern repeated over the depth ("gla,gla,mha"), or "none" (blocks without token mixing).
    An entry "shared:<mixer>" makes those layers one shared block (module docstring).
  mixer_kwargs: mixer name -> dict of that mixer's hyperparameters (entries for mixers not in
    the pattern are allowed and unused, so a sweep can keep them all).
  mlp: "swiglu" | "geglu" (tanh-GELU gate: Gemma, Griffin) | "gelu" (exact erf) | "gelu_tanh"
    (GPT-2's tanh approximation) | "rwkv_channel_mix" (stateful, RWKV-6's) | "pkm" (product-key
    memory, Lample+ 2019) | "peer" (product-key retrieval of single-neuron experts, He 2024) |
    "none". pkm / peer keep their own heads / top-k defaults (their modules' docstrings).
    mlp_ratio: hidden M = round(mlp_ratio · D); None -> 8/3 (swiglu, geglu), 4 (gelu, gelu_tanh,
    pkm and peer, where M is the wanted number of slots / experts), or RWKV-6's
    int(3.5 · D) rounded down to a multiple of 32 (rwkv_channel_mix).
  shared_mlp: None (shared blocks use `mlp`), or the MLP of the "shared:<mixer>" blocks, with
    the same choices; its hidden width follows mlp_ratio the same way.
  norm: "rmsnorm" | "layernorm" | "rmsnorm_1p" (RMSNorm scaled by 1 + w, Gemma's). norm_eps: its
    epsilon.
  use_bias: biases in norms (layernorm) and MLPs (nanoGPT's `bias`).
  tie_embeddings: the head is the transposed token embedding.
  embed_scale: the token embeddings are multiplied by it (1; Gemma / RecurrentGemma: √D, which
    transformers rounds to bfloat16 first).
  logit_softcap: None, or c: logits = c · tanh(logits / c) (RecurrentGemma / Gemma 2: 30).
  pos_embedding: "none" | "learned" (absolute, added at the embedding; up to max_len).
  max_len: size of the learned position table.
  dropout: rate after the embedding and on each residual branch (training only).
  dtype: compute dtype; param_dtype: parameter dtype. Logits are float32 either way.
  scan_layers: run the blocks under nn.scan (one compiled block); needs one mixer for all.
  remat: "none" | "full" | "dots" (jax.checkpoint policies applied per block).
  embed_init_scale: std of the token (and position) embedding init.
  init_std: std of MLP and untied-head kernels.
  residual_init_scaling: scale MLP output kernels by 1/sqrt(2·n_layers) (GPT-2).
  """
  vocab_size: int
  d_model: int
  n_layers: int
  mixer: str = "mha"
  mixer_kwargs: Any = dataclasses.field(default_factory=dict)
  mlp: str = "swiglu"
  mlp_ratio: float | None = None
  shared_mlp: str | None = None
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  use_bias: bool = False
  tie_embeddings: bool = True
  embed_scale: float = 1.0
  logit_softcap: float | None = None
  pos_embedding: str = "none"
  max_len: int = 2048
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  embed_init_scale: float = 0.02
  init_std: float = 0.02
  residual_init_scaling: bool = False

  def __post_init__(self):
    # Hashable fields (jit static arguments, caches keyed by the model): nested dicts become
    # FrozenDicts and lists tuples; mixers receive them as such.
    object.__setattr__(self, "mixer_kwargs", _freeze(self.mixer_kwargs or {}))
    super().__post_init__()

  def layer_mixers(self) -> list[str]:
    """One mixer name per layer, after checking the whole configuration."""
    if self.n_layers < 1:
      raise ValueError(f"n_layers={self.n_layers} must be >= 1.")
    if self.mlp != "none" and self.mlp not in MLPS:
      raise ValueError(f"mlp={self.mlp!r} is not one of {sorted(MLPS) + ['none']}.")
    if self.shared_mlp not in (None, "none", *MLPS):
      raise ValueError(f"shared_mlp={self.shared_mlp!r} is not None or one of "
                       f"{sorted(MLPS) + ['none']}.")
    if self.norm not in norms.NORMS:
      raise ValueError(f"norm={self.norm!r} is not one of {sorted(norms.NORMS)}.")
    if self.pos_embedding not in ("none", "learned"):
      raise ValueError(f"pos_embedding={self.pos_embedding!r} is not 'none' or 'learned'.")
    if self.logit_softcap is not None and not self.logit_softcap > 0:
      raise ValueError(f"logit_softcap={self.logit_softcap} must be > 0 (RecurrentGemma: 30) "
                       "or None (no cap).")
    if self.remat not in ("none", *REMAT_POLICIES):
      raise ValueError(f"remat={self.remat!r} is not one of {['none', *REMAT_POLICIES]}.")
    for name in self.mixer_kwargs or {}:
      registry.get(name)  # a typo in a mixer_kwargs key fails with the closest name
    if self.mixer.strip() == NO_MIXER:
      return [NO_MIXER] * self.n_layers
    names = registry.expand_pattern(self.mixer, self.n_layers)
    for name in sorted({registry.base_name(n) for n in names}):
      _check_mixer_kwargs(name, (self.mixer_kwargs or {}).get(name, {}))
    shared = sorted({n for n in names if n != registry.base_name(n)})
    if self.scan_layers and shared:
      raise ValueError(f"scan_layers=True stacks one parameter set per layer, but {shared} "
                       f"share one block across layers; set scan_layers=False.")
    if self.shared_mlp is not None and not shared:
      raise ValueError(f"shared_mlp={self.shared_mlp!r} is set but mixer={self.mixer!r} has no "
                       f"'shared:<mixer>' layers; drop shared_mlp or share a layer.")
    if self.scan_layers and len(set(names)) > 1:
      raise ValueError(
          f"scan_layers=True needs the same mixer in every layer, but mixer={self.mixer!r} "
          f"gives {sorted(set(names))}; set scan_layers=False for a hybrid stack.")
    return names

  def _layer_mlp(self, layer: str) -> str:
    """The MLP name of one layer: shared_mlp for a shared block when given, else mlp."""
    if layer != registry.base_name(layer) and self.shared_mlp is not None:
      return self.shared_mlp
    return self.mlp

  def _mlp_hidden(self, mlp: str | None = None) -> int:
    mlp = self.mlp if mlp is None else mlp
    if mlp == "none":
      return 0
    if mlp == "rwkv_channel_mix" and self.mlp_ratio is None:
      return rwkv_channel_mix.rwkv_hidden(self.d_model)
    ratio = DEFAULT_MLP_RATIO[mlp] if self.mlp_ratio is None else self.mlp_ratio
    return max(1, round(ratio * self.d_model))

  def _block_kwargs(self, deterministic: bool, mlp: str | None = None) -> dict:
    mlp = self.mlp if mlp is None else mlp
    out_std = self.init_std / (math.sqrt(2 * self.n_layers) if self.residual_init_scaling else 1)
    return dict(d_model=self.d_model, n_layers=self.n_layers, mlp=mlp,
                mlp_hidden=self._mlp_hidden(mlp), norm=self.norm, norm_eps=self.norm_eps,
                use_bias=self.use_bias, dropout=self.dropout, deterministic=deterministic,
                init_std=self.init_std, mlp_out_std=out_std, dtype=self.dtype,
                param_dtype=self.param_dtype)

  def _block_cls(self):
    if self.remat == "none":
      return Block
    # Under scan, CSE across the loop body is impossible anyway; outside it, keep prevent_cse.
    return nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)

  @nn.compact
  def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True, logit_positions=None):
    """tokens [B, T] int -> (logits [B, T, Vo] float32, new cache or None).

    segment_ids [B, T] int: packed documents. positions [B, T] int: see the module docstring.
    cache: from `init_cache` (a tuple of BlockCache; one stacked BlockCache if scan_layers).
    logit_positions: None, or [B, P] int time indices: logits only there ([B, P, Vo]), so a
      task scored at few positions (MQAR) never forms the [B, T, Vo] logits.
    """
    names = self.layer_mixers()
    b, t = tokens.shape
    embed = embed_lib.Embed(self.vocab_size, self.d_model,
                     embedding_init=axes.param(nn.initializers.normal(self.embed_init_scale),
                                               axes.VOCAB, axes.EMBED),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="embed")
    x = embed(tokens)  # [b, t, d]
    if self.embed_scale != 1.0:
      x = x * jnp.asarray(self.embed_scale, x.dtype)
    if self.pos_embedding == "learned":
      if positions is None:
        if cache is not None:
          raise ValueError("pos_embedding='learned' with a cache needs explicit `positions` "
                           "(the model does not count decoded tokens); pass positions [B, T].")
        if t > self.max_len:
          raise ValueError(f"sequence length {t} exceeds max_len={self.max_len} of the learned "
                           f"position table; raise max_len or shorten the sequence.")
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      x = x + learned.LearnedPositionEmbedding(
          self.max_len, self.d_model, self.embed_init_scale, dtype=self.dtype,
          param_dtype=self.param_dtype, name="pos_embed")(positions)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)

    block_cls, kw = self._block_cls(), self._block_kwargs(deterministic)
    if self.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast), length=self.n_layers,
                        metadata_params=_SCAN_META)
      x, new_cache = scanned(mixer_name=names[0],
                             mixer_kwargs=(self.mixer_kwargs or {}).get(names[0], {}),
                             layer_idx=0, name="blocks", **kw)(x, cache, segment_ids, positions)
    else:
      if cache is not None and len(cache) != self.n_layers:
        raise ValueError(f"cache has {len(cache)} blocks but the model has {self.n_layers}; "
                         f"build it with this model's init_cache.")
      new_caches, shared = [], {}
      for i, name in enumerate(names):
        base = registry.base_name(name)
        kwargs = dict(mixer_name=base, mixer_kwargs=(self.mixer_kwargs or {}).get(base, {}),
                      layer_idx=i)
        if name != base:  # one module, built at its first application, called at every one
          if name not in shared:
            shared[name] = block_cls(**kwargs, name=f"shared_{base}",
                                     **self._block_kwargs(deterministic, self._layer_mlp(name)))
          block = shared[name]
        else:
          block = block_cls(**kwargs, name=f"block_{i}", **kw)
        x, c = block(x, None if cache is None else cache[i], segment_ids, positions)
        new_caches.append(c)
      new_cache = None if cache is None else tuple(new_caches)

    x = norms.make_norm(self.norm, eps=self.norm_eps, use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="norm_final")(x)
    if logit_positions is not None:
      x = jnp.take_along_axis(x, logit_positions[..., None].astype(jnp.int32), axis=1)  # [b,p,d]
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=axes.param(nn.initializers.normal(self.init_std),
                                               axes.EMBED, axes.VOCAB), name="head")(x)
    logits = logits.astype(jnp.float32)
    if self.logit_softcap is not None:
      logits = self.logit_softcap * jnp.tanh(logits / self.logit_softcap)
    return logits, new_cache

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    """Empty decoding caches: a tuple of BlockCache (one per block), or one BlockCache whose
    leaves are stacked on a leading [n_layers] axis when scan_layers. Callable unbound."""
    names = self.layer_mixers()
    caches = []
    for i, name in enumerate(names):
      mixer_cache = None
      if name != NO_MIXER:
        base = registry.base_name(name)
        # A shared block is built with the layer_idx of its first application.
        idx = 0 if self.scan_layers else (names.index(name) if name != base else i)
        mixer = registry.get(base).cls(
            d_model=self.d_model, layer_idx=idx, n_layers=self.n_layers,
            dtype=self.dtype, param_dtype=self.param_dtype, parent=None,
            **dict((self.mixer_kwargs or {}).get(base, {})))
        mixer_cache = mixer.init_cache(batch_size, max_len, dtype=dtype)
      mlp_cache = None
      mlp = self._layer_mlp(name)
      cls = MLPS.get(mlp)
      if cls is not None and getattr(cls, "stateful", False):
        mlp_cache = cls(hidden=self._mlp_hidden(mlp), d_model=self.d_model, dtype=self.dtype,
                        param_dtype=self.param_dtype, parent=None).init_cache(
                            batch_size, max_len, dtype=dtype)
      caches.append(BlockCache(mixer_cache, mlp_cache))
    if self.scan_layers:
      return jax.tree.map(lambda *xs: jnp.stack(xs), *caches)
    return tuple(caches)


_SCAN_META = {nn.PARTITION_NAME: None}  # the stacked layer axis is replicated
_is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)


def _stack(*xs):
  if _is_box(xs[0]):  # keep logical axis names: the new leading layer axis is unnamed
    return xs[0].replace_boxed(jnp.stack([x.unbox() for x in xs])).add_axis(0, _SCAN_META)
  return jnp.stack(xs)


def _take(x, i):
  if _is_box(x):
    return x.remove_axis(0, _SCAN_META).replace_boxed(x.unbox()[i])
  return x[i]


def stack_block_params(params, n_layers: int):
  """Unscanned params ({"block_<i>": ...}) -> scanned layout ({"blocks": leaves [L, ...]}).

  Works on boxed (LogicallyPartitioned) and unboxed params alike.
  """
  params = dict(params)
  blocks = [params.pop(f"block_{i}") for i in range(n_layers)]
  params["blocks"] = jax.tree.map(_stack, *blocks, is_leaf=_is_box)
  return params


def unstack_block_params(params, n_layers: int):
  """Scanned params ({"blocks": leaves [L, ...]}) -> unscanned layout ({"block_<i>": ...})."""
  params = dict(params)
  blocks = params.pop("blocks")
  for i in range(n_layers):
    params[f"block_{i}"] = jax.tree.map(lambda x, i=i: _take(x, i), blocks, is_leaf=_is_box)
  return params


_FIELDS = [f.name for f in dataclasses.fields(LanguageModel) if f.name not in ("parent", "name")]


def from_config(cfg) -> LanguageModel:
  """A LanguageModel from an ml_collections ConfigDict or a dict whose keys are its fields.

  Unknown keys fail with the valid fields and the closest match.
  """
  items = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  for key in items:
    if key not in _FIELDS:
      close = difflib.get_close_matches(key, _FIELDS, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"model config has unknown field {key!r}.{hint} "
                       f"LanguageModel fields: {', '.join(_FIELDS)}.")
  if isinstance(items.get("dtype"), str):
    items["dtype"] = jnp.dtype(items["dtype"])
  if isinstance(items.get("param_dtype"), str):
    items["param_dtype"] = jnp.dtype(items["param_dtype"])
  return LanguageModel(**items)
