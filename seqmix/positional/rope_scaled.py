"""RoPE context-extension rules as registered positional components (`mha(position=...)`).

Each component is RoPE with the inverse frequencies (and attention factor) of
`seqmix.positional.rope_scaling` for one rule, its hyperparameters as fields. They rotate q
and k once per token, so the cached keys stay valid and decoding equals the parallel form.
The two Hugging Face types whose frequencies depend on the current length ("dynamic",
"longrope") take that length as a fixed field here (`context_len`: the length the model is
run at), which keeps the cache valid; for HF's per-call behaviour (cached keys keep the
frequencies of the call that wrote them) use `mha(rope_scaling={...})` instead.
"""

import jax.numpy as jnp

from seqmix.positional import rope
from seqmix.positional import rope_scaling as scaling
from seqmix.positional.base import PositionalComponent, register


class _ScaledRoPE(PositionalComponent):
  """Base: RoPE with `rope_scaling.rope_parameters(self.scaling(), ...)`."""
  ROTATES = True

  def scaling(self) -> dict:
    raise NotImplementedError

  def seq_len(self):
    return None

  def rotate(self, q, k, positions):
    r = rope.rotary_dim(q.shape[-1], self.rope_fraction)
    inv, factor = scaling.rope_parameters(self.scaling(), r, self.rope_base,
                                          seq_len=self.seq_len())
    rot = lambda x: rotate_scaled(x, positions, inv, factor).astype(x.dtype)
    return rot(q), rot(k)


def rotate_scaled(x, positions, inv_freq, factor=1.0):
  """Rotate-half RoPE of x [B,T,H,D] at positions [B,T] by inv_freq [R/2]; the rotated
  channels times `factor` (HF's attention factor on cos and sin). float32."""
  r = 2 * inv_freq.shape[0]
  ang = positions.astype(jnp.float32)[..., None] * inv_freq                    # [b, t, r/2]
  cos = jnp.cos(ang)[:, :, None] * factor                                      # [b, t, 1, r/2]
  sin = jnp.sin(ang)[:, :, None] * factor
  x = x.astype(jnp.float32)
  x1, x2, rest = x[..., : r // 2], x[..., r // 2: r], x[..., r:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


@register("pi", paper="Extending Context Window of Large Language Models via Positional "
          "Interpolation", year=2023, venue="arXiv", url="https://arxiv.org/abs/2306.15595",
          parents=("rope",))
class PositionInterpolation(_ScaledRoPE):
  """Position Interpolation: RoPE at positions p/s, i.e. θ'_i = θ_i / s (HF rope_type
  "linear"), so a context s times the training length maps into the trained range.
  factor: s >= 1."""
  factor: float = 4.0

  def scaling(self):
    return {"rope_type": "linear", "factor": self.factor}


@register("ntk_aware", paper="NTK-Aware Scaled RoPE (bloc97, r/LocalLLaMA)", year=2023,
          venue="Reddit", url="https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/",
          parents=("rope",))
class NTKAware(_ScaledRoPE):
  """NTK-aware scaling: base' = base · α^(R/(R−2)), θ'_i = base'^(−2i/R): the highest
  frequency is kept (extrapolated), the lowest divided by exactly α (interpolated).
  alpha: α >= 1."""
  alpha: float = 4.0

  def scaling(self):
    return {"rope_type": "ntk", "factor": self.alpha}


@register("dynamic_ntk", paper="Dynamically Scaled RoPE (emozilla, r/LocalLLaMA; Hugging Face "
          "rope_scaling 'dynamic')", year=2023, venue="Reddit",
          url="https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/", parents=("ntk_aware",))
class DynamicNTK(_ScaledRoPE):
  """Dynamic NTK: base' = base · (s·L/L₀ − (s − 1))^(R/(R−2)) with L = max(context_len, L₀)
  (HF's formula, L₀ = train_len). HF recomputes L from every call's length; this component
  fixes L = context_len so cached keys stay valid (module docstring).
  factor: s; train_len: L₀; context_len: L."""
  factor: float = 2.0
  train_len: int = 256
  context_len: int = 1024

  def scaling(self):
    return {"rope_type": "dynamic", "factor": self.factor,
            "max_position_embeddings": self.train_len}

  def seq_len(self):
    return int(self.context_len)


@register("yarn", paper="YaRN: Efficient Context Window Extension of Large Language Models",
          year=2024, venue="ICLR", url="https://arxiv.org/abs/2309.00071",
          parents=("ntk_aware", "pi"))
class YaRN(_ScaledRoPE):
  """YaRN (HF rope_type "yarn"): NTK-by-parts, θ'_i = θ_i/s · ramp_i + θ_i · (1 − ramp_i) with
  ramp_i = clip((i − low)/(high − low), 0, 1), low/high the dimensions whose wavelength makes
  β_fast / β_slow turns over L₀ = train_len (r(n) = R ln(L₀/(2πn)) / (2 ln base), floored /
  ceiled); cos and sin times √t = 0.1 ln s + 1 (logits times t) unless attention_factor.
  factor: s; train_len: L₀; beta_fast, beta_slow (32, 1); attention_factor (None: 0.1 ln s + 1)."""
  factor: float = 4.0
  train_len: int = 256
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None

  def scaling(self):
    return {"rope_type": "yarn", "factor": self.factor, "max_position_embeddings": self.train_len,
            "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
            "attention_factor": self.attention_factor}


@register("longrope", paper="LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens",
          year=2024, venue="ICML", url="https://arxiv.org/abs/2402.13753", parents=("pi",))
class LongRoPE(_ScaledRoPE):
  """LongRoPE (HF rope_type "longrope"): θ'_i = θ_i / f_i with per-frequency factors f (the
  long ones when context_len > train_len, else the short ones); cos and sin times
  √(1 + ln s / ln L₀) (s = factor, L₀ = train_len) unless attention_factor.
  short_factor / long_factor: R/2 numbers each (None: all 1 / all `factor`, i.e. uniform
  interpolation; LongRoPE's evolutionary search for them is not reproduced)."""
  factor: float = 4.0
  train_len: int = 256
  context_len: int = 1024
  short_factor: tuple | None = None
  long_factor: tuple | None = None
  attention_factor: float | None = None

  def _factors(self, r):
    short = self.short_factor or (1.0,) * (r // 2)
    long = self.long_factor or (float(self.factor),) * (r // 2)
    return list(short), list(long)

  def rotate(self, q, k, positions):
    r = rope.rotary_dim(q.shape[-1], self.rope_fraction)
    short, long = self._factors(r)
    cfg = {"rope_type": "longrope", "factor": self.factor, "short_factor": short,
           "long_factor": long, "max_position_embeddings": self.train_len,
           "attention_factor": self.attention_factor}
    inv, factor = scaling.rope_parameters(cfg, r, self.rope_base, seq_len=int(self.context_len))
    return (rotate_scaled(q, positions, inv, factor).astype(q.dtype),
            rotate_scaled(k, positions, inv, factor).astype(k.dtype))


@register("llama3_rope", paper="The Llama 3 Herd of Models (RoPE scaling of Llama 3.1)",
          year=2024, venue="arXiv", url="https://arxiv.org/abs/2407.21783", parents=("pi",))
class Llama3RoPE(_ScaledRoPE):
  """Llama 3.1 RoPE scaling (HF rope_type "llama3"): wavelength λ_i = 2π/θ_i; θ_i kept where
  λ_i < L₀/high_freq_factor, θ_i/s where λ_i > L₀/low_freq_factor, in between
  (1 − g)θ_i/s + gθ_i with g = (L₀/λ_i − low)/(high − low). L₀ = train_len."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  train_len: int = 256

  def scaling(self):
    return {"rope_type": "llama3", "factor": self.factor, "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.train_len}


@register("abf", paper="Effective Long-Context Scaling of Foundation Models (Llama 2 Long, "
          "adjusted base frequency)", year=2024, venue="NAACL",
          url="https://arxiv.org/abs/2309.16039", parents=("rope",))
class ABF(_ScaledRoPE):
  """Adjusted base frequency: plain RoPE with a larger base, θ_i = b'^(−2i/R) (Llama 2 Long:
  b' = 500000 instead of 10000), with continual pretraining on long data (not reproduced).
  abf_base: b' (overrides the mixer's rope_base)."""
  abf_base: float = 500000.0

  def scaling(self):
    return {"rope_type": "abf", "rope_theta": self.abf_base}


@register("giraffe_power", paper="Giraffe: Adventures in Expanding Context Lengths in LLMs "
          "(power scaling)", year=2023, venue="arXiv", url="https://arxiv.org/abs/2308.10882",
          parents=("rope",))
class GiraffePower(_ScaledRoPE):
  """Giraffe power scaling: θ'_i = θ_i (1 − 2i/R)^k: high frequencies barely move, low ones
  shrink (k > 0). power: k >= 0."""
  power: float = 0.5

  def scaling(self):
    return {"rope_type": "giraffe_power", "power": self.power}


@register("giraffe_truncated", paper="Giraffe: Adventures in Expanding Context Lengths in LLMs "
          "(truncated basis)", year=2023, venue="arXiv", url="https://arxiv.org/abs/2308.10882",
          parents=("rope",))
class GiraffeTruncated(_ScaledRoPE):
  """Giraffe truncated basis: θ'_i = θ_i if θ_i >= b; ρ if a < θ_i < b; 0 if θ_i <= a (the
  lowest frequencies stop rotating). a, b, rho: 0 <= a < b."""
  a: float = 1e-3
  b: float = 0.1
  rho: float = 0.01

  def scaling(self):
    return {"rope_type": "giraffe_truncated", "a": self.a, "b": self.b, "rho": self.rho}


@register("entropy_abf", paper="Extending LLMs' Context Window with 100 Samples (entropy-aware "
          "ABF)", year=2024, venue="arXiv", url="https://arxiv.org/abs/2401.07004",
          parents=("abf",))
class EntropyABF(_ScaledRoPE):
  """Entropy-aware ABF: RoPE with base b' and the query scaled by
  λ_p = max(1, log(p + 1) / log(L_train)) (so the logits of the query at position p scale by
  λ_p, keeping the attention entropy from growing with the context).
  abf_base: b' (500000); train_len: L_train."""
  abf_base: float = 500000.0
  train_len: int = 256

  def scaling(self):
    return {"rope_type": "abf", "rope_theta": self.abf_base}

  def rotate(self, q, k, positions):
    q, k = super().rotate(q, k, positions)
    lam = scaling.entropy_aware_logit_scale(positions, self.train_len)[:, :, None, None]
    return (q.astype(jnp.float32) * lam).astype(q.dtype), k


@register("scaling_law_base", paper="Scaling Laws of RoPE-based Extrapolation", year=2024,
          venue="ICLR", url="https://arxiv.org/abs/2310.05209", parents=("abf",))
class ScalingLawBase(_ScaledRoPE):
  """The scaling-law base rule: RoPE with the base whose extrapolation bound
  2π·β^(d_extra/R) equals target_len, β = (target_len/2π)^(R/d_extra), d_extra =
  2⌈(R/2)·log_{base₀}(train_len/2π)⌉ the critical dimension of the pretraining base base₀
  (the mixer's rope_base). The paper then fine-tunes at train_len (not reproduced)."""
  train_len: int = 256
  target_len: int = 4096

  def rotate(self, q, k, positions):
    r = rope.rotary_dim(q.shape[-1], self.rope_fraction)
    beta = scaling.base_for_context(self.target_len, r, self.train_len, self.rope_base)
    inv, _ = scaling.rope_parameters({"rope_type": "abf", "rope_theta": beta}, r,
                                     self.rope_base)
    return (rotate_scaled(q, positions, inv).astype(q.dtype),
            rotate_scaled(k, positions, inv).astype(k.dtype))


__all__ = ["PositionInterpolation", "NTKAware", "DynamicNTK", "YaRN", "LongRoPE", "Llama3RoPE",
           "ABF", "GiraffePower", "GiraffeTruncated", "EntropyABF", "ScalingLawBase",
           "rotate_scaled"]
