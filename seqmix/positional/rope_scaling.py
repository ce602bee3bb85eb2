"""RoPE scaling for context extension: Hugging Face's `rope_scaling` dicts and related rules.

`rope_parameters(rope_scaling, rot_dim, base, seq_len=None) -> (inv_freq [R/2], attention_factor)`
gives the inverse frequencies θ_i (R = rotated channels of a head, i = 0 .. R/2 − 1) and the
factor that multiplies cos and sin (so the q·k logits scale by attention_factor²), exactly as
transformers' `modeling_rope_utils` computes them for the same dict. With θ⁰_i = base^(−2i/R):

  "default"   θ_i = θ⁰_i, factor 1.
  "linear"    (Position Interpolation, Chen et al. 2023) θ_i = θ⁰_i / s, s = `factor`.
  "dynamic"   (dynamic NTK, bloc97 / emozilla 2023) base' = base·(s·L/L₀ − (s − 1))^(R/(R−2)),
              L = max(seq_len, L₀), L₀ = `max_position_embeddings`; θ_i = base'^(−2i/R).
              seq_len is the current sequence length (HF: max position id + 1 of the call).
  "yarn"      (Peng et al. 2024) NTK-by-parts: with r(n) = R·ln(L₀/(2πn)) / (2 ln base),
              low = max(⌊r(β_fast)⌋, 0), high = min(⌈r(β_slow)⌉, R − 1) (no ⌊⌋/⌈⌉ when
              `truncate` is False), ramp_i = clip((i − low)/(high − low), 0, 1):
              θ_i = θ⁰_i/s · ramp_i + θ⁰_i · (1 − ramp_i). β_fast = 32, β_slow = 1 by default.
              L₀ = `original_max_position_embeddings` if given (then s = max_pos / L₀), else
              `max_position_embeddings`. factor = `attention_factor`, else
              m(s, mscale)/m(s, mscale_all_dim) when both are set, else m(s, 1), with
              m(s, μ) = 0.1 μ ln s + 1 for s > 1 and 1 otherwise.
  "longrope"  (Ding et al. 2024) θ_i = θ⁰_i / f_i with f = `long_factor` when seq_len > L₀ and
              `short_factor` otherwise (L₀ = `original_max_position_embeddings` if given, then
              s = max_pos / L₀; else L₀ = max_pos, s = `factor`); factor = `attention_factor`,
              else sqrt(1 + ln s / ln L₀) for s > 1, 1 otherwise.
  "llama3"    (Llama 3.1, 2024) wavelength λ_i = 2π/θ⁰_i, L₀ = `original_max_position_embeddings`:
              θ⁰_i/s where λ_i > L₀/low_freq_factor; θ⁰_i where λ_i < L₀/high_freq_factor;
              between, (1 − g)·θ⁰_i/s + g·θ⁰_i with g = (L₀/λ_i − low)/(high − low).

Hugging Face reads `max_position_embeddings` from the model config, not from `rope_scaling`;
here the dict carries it (key "max_position_embeddings", needed by dynamic, yarn and longrope).
"type" is accepted for "rope_type" (older HF configs), and a "rope_theta" key (transformers v5
`rope_parameters`) replaces `base` for every type. seqmix adds rope types for the other
rules, so any of them can be named in a config:

  "ntk"                NTK-aware (bloc97 2023): base' = base·α^(R/(R−2)), α = `factor`.
  "abf"                adjusted base frequency (Xiong et al. 2024, Llama-2-Long):
                       base' = `rope_theta`.
  "giraffe_power"      (Pal et al. 2023) θ_i = θ⁰_i · (1 − 2i/R)^k, k = `power`.
  "giraffe_truncated"  (Pal et al. 2023) θ_i = θ⁰_i if θ⁰_i ≥ b; ρ if a < θ⁰_i < b; 0 if θ⁰_i ≤ a.

Plus helpers: `ntk_aware_base`, `entropy_aware_logit_scale` (entropy-aware ABF, Zhang et al.
2024) and the scaling-law base rule of Liu et al. 2024 (`critical_dimension`,
`extrapolation_bound`, `base_for_context`). Static rope types are computed in float64 NumPy
and returned as float32; "dynamic" and "longrope" with a traced seq_len are computed in JAX.
"""

import math

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "ntk", "abf",
              "giraffe_power", "giraffe_truncated")

_REQUIRED = {
    "default": (), "linear": ("factor",), "dynamic": ("factor", "max_position_embeddings"),
    "yarn": ("factor", "max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "ntk": ("factor",), "abf": ("rope_theta",), "giraffe_power": ("power",),
    "giraffe_truncated": ("a", "b", "rho"),
}
# Types whose frequencies depend on the current sequence length.
SEQ_LEN_DEPENDENT = ("dynamic", "longrope")


def rope_type(rope_scaling) -> str:
  """The rope type a dict names ("rope_type", or the older "type"; "default" if neither)."""
  if rope_scaling is None:
    return "default"
  if not isinstance(rope_scaling, dict) and not hasattr(rope_scaling, "keys"):
    raise ValueError(f"rope_scaling={rope_scaling!r} must be a dict such as "
                     "{'rope_type': 'linear', 'factor': 4.0}, or None.")
  kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_scaling rope_type={kind!r} is unknown; use one of {ROPE_TYPES}.")
  missing = [k for k in _REQUIRED[kind] if rope_scaling.get(k) is None]
  if missing:
    raise ValueError(f"rope_scaling with rope_type={kind!r} is missing key(s) {missing} "
                     f"(it needs {list(_REQUIRED[kind])}); add them to the dict.")
  return kind


def _default_np(rot_dim, base):
  return 1.0 / (float(base) ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim))


def _yarn(cfg, rot_dim, base):
  factor = float(cfg["factor"])
  max_pos = cfg["max_position_embeddings"]
  if cfg.get("original_max_position_embeddings") is not None:
    orig = cfg["original_max_position_embeddings"]
    factor = max_pos / orig
  else:
    orig = max_pos

  def m(s, mu=1.0):
    return 1.0 if s <= 1 else 0.1 * mu * math.log(s) + 1.0

  att = cfg.get("attention_factor")
  if att is None:
    mscale, mscale_all = cfg.get("mscale"), cfg.get("mscale_all_dim")
    att = m(factor, mscale) / m(factor, mscale_all) if mscale and mscale_all else m(factor)
  beta_fast = cfg.get("beta_fast") or 32
  beta_slow = cfg.get("beta_slow") or 1

  def corr_dim(rot):
    return rot_dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

  low, high = corr_dim(beta_fast), corr_dim(beta_slow)
  if cfg.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rot_dim - 1)
  if low == high:
    high += 0.001   # as HF: a zero-width ramp becomes a step
  ramp = np.clip((np.arange(rot_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  theta = _default_np(rot_dim, base)
  return theta / factor * ramp + theta * (1.0 - ramp), float(att)


def _longrope_setup(cfg, rot_dim):
  max_pos = cfg["max_position_embeddings"]
  factor = cfg.get("factor")
  if cfg.get("original_max_position_embeddings") is not None:
    orig = cfg["original_max_position_embeddings"]
    factor = max_pos / orig
  else:
    orig = max_pos
  if factor is None:
    raise ValueError("rope_scaling with rope_type='longrope' is missing key ['factor'] (or "
                     "'original_max_position_embeddings', from which factor = "
                     "max_position_embeddings / original_max_position_embeddings).")
  att = cfg.get("attention_factor")
  if att is None:
    att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
  short = np.asarray(cfg["short_factor"], np.float64)
  long = np.asarray(cfg["long_factor"], np.float64)
  for name, f in (("short_factor", short), ("long_factor", long)):
    if f.shape != (rot_dim // 2,):
      raise ValueError(f"rope_scaling longrope {name} has {f.size} entries; it needs one per "
                       f"rotary frequency, R/2 = {rot_dim // 2}.")
  return short, long, orig, float(att)


def _llama3(cfg, rot_dim, base):
  theta = _default_np(rot_dim, base)
  factor = float(cfg["factor"])
  low_ff, high_ff = float(cfg["low_freq_factor"]), float(cfg["high_freq_factor"])
  if high_ff <= low_ff:
    raise ValueError(f"rope_scaling llama3 high_freq_factor={high_ff} must exceed "
                     f"low_freq_factor={low_ff}.")
  orig = float(cfg["original_max_position_embeddings"])
  wavelen = 2 * math.pi / theta
  out = np.where(wavelen > orig / low_ff, theta / factor, theta)
  smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
  smoothed = (1 - smooth) * out / factor + smooth * out
  medium = ~(wavelen < orig / high_ff) & ~(wavelen > orig / low_ff)
  return np.where(medium, smoothed, out)


def rope_parameters(rope_scaling, rot_dim: int, base: float = 10000.0, *, seq_len=None):
  """(inv_freq [R/2] float32, attention_factor) for a `rope_scaling` dict (None: default).

  seq_len: the current sequence length, read by "dynamic" and "longrope" only (None: the
  training length, as HF at init). May be a traced scalar (inv_freq is then traced; the
  attention factor depends on the config only and stays a Python float).
  """
  kind = rope_type(rope_scaling)
  if rot_dim < 2 or rot_dim % 2:
    raise ValueError(f"rot_dim={rot_dim} must be a positive even number of rotated channels.")
  cfg = rope_scaling or {}
  base = float(cfg.get("rope_theta") or base)   # transformers v5 `rope_parameters` carry it
  if base <= 1.0:
    raise ValueError(f"RoPE base={base} must be > 1 (10000 in the paper).")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  if kind == "default":
    return f32(_default_np(rot_dim, base)), 1.0
  if kind == "linear":
    return f32(_default_np(rot_dim, base) / float(cfg["factor"])), 1.0
  if kind == "ntk":
    return f32(_default_np(rot_dim, ntk_aware_base(base, cfg["factor"], rot_dim))), 1.0
  if kind == "abf":   # base already replaced by rope_theta above
    return f32(_default_np(rot_dim, base)), 1.0
  if kind == "giraffe_power":
    return f32(giraffe_power(rot_dim, base, cfg["power"])), 1.0
  if kind == "giraffe_truncated":
    return f32(giraffe_truncated(rot_dim, base, cfg["a"], cfg["b"], cfg["rho"])), 1.0
  if kind == "yarn":
    inv, att = _yarn(cfg, rot_dim, base)
    return f32(inv), att
  if kind == "llama3":
    return f32(_llama3(cfg, rot_dim, base)), 1.0
  if kind == "longrope":
    short, long, orig, att = _longrope_setup(cfg, rot_dim)
    theta = _default_np(rot_dim, base)
    if seq_len is None or isinstance(seq_len, (int, np.integer)):
      ext = long if seq_len is not None and seq_len > orig else short
      return f32(theta / ext), att
    use_long = jnp.asarray(seq_len) > orig
    return jnp.where(use_long, f32(theta / long), f32(theta / short)), att
  # dynamic NTK
  factor = float(cfg["factor"])
  max_pos = cfg["max_position_embeddings"]
  if seq_len is None or isinstance(seq_len, (int, np.integer)):
    length = max_pos if seq_len is None else max(int(seq_len), max_pos)
    new_base = base * ((factor * length / max_pos) - (factor - 1)) ** (rot_dim / (rot_dim - 2))
    return f32(_default_np(rot_dim, new_base)), 1.0
  length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(max_pos))
  new_base = base * ((factor * length / max_pos) - (factor - 1)) ** (rot_dim / (rot_dim - 2))
  expo = jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim
  return 1.0 / (new_base ** expo), 1.0


def ntk_aware_base(base: float, alpha: float, rot_dim: int) -> float:
  """NTK-aware scaled base (bloc97 2023): base · α^(R/(R−2)); the lowest frequency is then
  exactly θ⁰_{R/2−1}/α (interpolated) while θ_0 = 1 is kept (extrapolated)."""
  if alpha < 1.0:
    raise ValueError(f"NTK-aware alpha={alpha} must be >= 1 (the context extension ratio).")
  return float(base) * float(alpha) ** (rot_dim / (rot_dim - 2))


def giraffe_power(rot_dim: int, base: float, power: float):
  """Giraffe power scaling (Pal et al. 2023): θ_i = θ⁰_i (1 − 2i/R)^k, float64 [R/2].

  High frequencies (small i) barely change; low ones shrink towards 0 (k > 0)."""
  if power < 0:
    raise ValueError(f"giraffe power={power} must be >= 0 (0: plain RoPE).")
  i = np.arange(rot_dim // 2, dtype=np.float64)
  return _default_np(rot_dim, base) * (1.0 - 2.0 * i / rot_dim) ** float(power)


def giraffe_truncated(rot_dim: int, base: float, a: float, b: float, rho: float):
  """Giraffe truncated basis (Pal et al. 2023), float64 [R/2]: keep θ⁰_i ≥ b, set the band
  a < θ⁰_i < b to the constant ρ, zero the frequencies ≤ a (those positions stop rotating)."""
  if not 0.0 <= a < b:
    raise ValueError(f"giraffe_truncated needs 0 <= a < b; got a={a}, b={b}.")
  theta = _default_np(rot_dim, base)
  return np.where(theta >= b, theta, np.where(theta > a, float(rho), 0.0))


def entropy_aware_logit_scale(positions, train_len: int):
  """Entropy-aware ABF's logit scale (Zhang et al. 2024, "Extending LLMs' Context Window with
  100 Samples"): λ = max(1, log(p + 1) / log(L_train)) for the query at position p (log base
  L_train of the number of tokens it sees). Multiply the logits (q·k/sqrt(d)) by λ; use
  with "abf" (a larger base). positions [B,T] int -> [B,T] float32."""
  if train_len < 2:
    raise ValueError(f"train_len={train_len} must be >= 2.")
  n = jnp.asarray(positions, jnp.float32) + 1.0
  return jnp.maximum(1.0, jnp.log(n) / math.log(train_len))


def critical_dimension(rot_dim: int, base: float, train_len: int) -> int:
  """Liu et al. 2024 ("Scaling Laws of RoPE-based Extrapolation"): d_extra =
  2⌈(R/2)·log_base(L_train/2π)⌉, the number of channels whose period 2π/θ_i fits in the
  training length (they see a full rotation in training; the rest do not)."""
  return min(rot_dim, 2 * math.ceil((rot_dim / 2) * math.log(train_len / (2 * math.pi))
                                    / math.log(base)))


def extrapolation_bound(rot_dim: int, base: float, train_len: int,
                        pretrain_base: float = 10000.0) -> float:
  """Liu et al. 2024: a model pre-trained with base `pretrain_base` at L_train and tuned with a
  larger `base` extrapolates up to T_extra = 2π · base^(d_extra/R), d_extra the critical
  dimension of the pre-training base."""
  d_extra = critical_dimension(rot_dim, pretrain_base, train_len)
  return 2 * math.pi * float(base) ** (d_extra / rot_dim)


def base_for_context(target_len: int, rot_dim: int, train_len: int,
                     pretrain_base: float = 10000.0) -> float:
  """The base whose `extrapolation_bound` is `target_len` (Liu et al. 2024, the scaling law
  solved for the base): (T/2π)^(R/d_extra)."""
  if target_len <= 2 * math.pi:
    raise ValueError(f"target_len={target_len} must exceed 2π.")
  d_extra = critical_dimension(rot_dim, pretrain_base, train_len)
  return (target_len / (2 * math.pi)) ** (rot_dim / d_extra)
