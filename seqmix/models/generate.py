"""Sampling from a LanguageModel: one prefill, then one jitted step per new token.

    tokens, lengths = generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=16,
                               rng=jax.random.key(0), temperature=0.8, top_k=20)

Prompts of different lengths are LEFT-padded to the longest one. The pad tokens form their
own document (segment id 0; the prompt and everything generated after it are segment 1) and
each row's positions start at 0 on its first real token, so with any mixer that follows the
protocol (state never crosses a segment boundary, positions are the caller's) a row's
continuation is the one it gets when generated alone. Only the mixers' segment and position
handling is relied on; the model holds no padding logic.

Sampling is per row, with keys folded from `rng` by step: greedy decoding (or top_k=1) is
independent of the batch composition, random sampling depends on the row's index.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_PAD_SEGMENT, _TEXT_SEGMENT = 0, 1


def left_pad(prompts, pad_id: int = 0):
  """A list of int lists -> (tokens [B, L] int32 left-padded, lengths [B] int32)."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.size == 0 or lengths.min() < 1:
    raise ValueError(f"every prompt needs at least one token; got lengths {lengths.tolist()}.")
  width = int(lengths.max())
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = np.asarray(p, np.int32)
  return tokens, lengths


def _pad_layout(lengths, width):
  """segment_ids [B, L] (0 on pads, 1 on text) and positions [B, L] (0 at each first token)."""
  col = np.arange(width, dtype=np.int32)[None]
  offset = (width - lengths)[:, None]
  seg = np.where(col >= offset, _TEXT_SEGMENT, _PAD_SEGMENT).astype(np.int32)
  pos = np.maximum(col - offset, 0).astype(np.int32)
  return seg, pos


def sample_logits(logits, key, *, temperature=1.0, top_k=None, top_p=None, greedy=False):
  """logits [B, Vo] float32 -> tokens [B] int32.

  greedy: argmax. Otherwise logits / temperature, restricted to the top_k largest and then to
  the smallest set whose probability reaches top_p (the token crossing top_p is kept).
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0 (use greedy=True for argmax).")
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    k = min(int(top_k), logits.shape[-1])
    if k < 1:
      raise ValueError(f"top_k={top_k} must be >= 1.")
    kth = jax.lax.top_k(logits, k)[0][:, -1:]                    # [b, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p} must be in (0, 1].")
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)  # [b, vo] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled(model, temperature, top_k, top_p, greedy):
  """Jitted (prefill, step) for one model and sampling setting, reused across calls.

  Sampling sits inside both, so each generated token is one dispatch.
  """
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy)

  @jax.jit
  def prefill(variables, tokens, seg, pos, cache, key):
    logits, cache = model.apply(variables, tokens, segment_ids=seg, positions=pos, cache=cache)
    return sample(logits[:, -1], key), cache

  @jax.jit
  def step(variables, token, position, cache, key):
    seg_t = jnp.full((token.shape[0], 1), _TEXT_SEGMENT, jnp.int32)
    logits, cache = model.apply(variables, token[:, None], segment_ids=seg_t,
                                positions=position[:, None], cache=cache)
    return sample(logits[:, -1], key), cache

  return prefill, step


def generate(model, params, prompts, *, max_new_tokens: int, rng=None, temperature: float = 1.0,
             top_k=None, top_p=None, greedy: bool = False, eos_id=None, lengths=None,
             pad_id: int = 0, cache_len=None):
  """Continue each prompt by `max_new_tokens` tokens.

  model: a LanguageModel; params: its params (the "params" collection, boxed or not).
  prompts: a list of int lists, or a left-padded int array [B, L] together with `lengths` [B].
  rng: a PRNG key (unused when greedy). temperature, top_k, top_p, greedy: see `sample_logits`.
  eos_id: a row that emits it stops; its later tokens are `eos_id`.
  cache_len: decoding cache length (default: padded prompt length + max_new_tokens); a fixed
    value keeps the step's shapes, hence its compilation, the same across calls.
  Returns (tokens [B, max_new_tokens] int32, lengths [B] int32: tokens generated up to and
  including the first eos, else max_new_tokens).
  """
  if lengths is None:
    tokens, lengths = left_pad(prompts, pad_id)
  else:
    tokens, lengths = np.asarray(prompts, np.int32), np.asarray(lengths, np.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
      raise ValueError(f"prompts [B, L] and lengths [B] expected; got {tokens.shape=}, "
                       f"{lengths.shape=}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  if not greedy and rng is None:
    raise ValueError("sampling needs `rng` (a jax.random.key); or pass greedy=True.")
  if not greedy and temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0 (use greedy=True for argmax).")
  b, width = tokens.shape
  seg, pos = _pad_layout(lengths, width)
  variables = {"params": params}
  key = jax.random.key(0) if rng is None else rng
  prefill, step = _compiled(model, temperature, top_k, top_p, greedy)
  if cache_len is None:
    cache_len = width + max_new_tokens
  elif cache_len < width + max_new_tokens:
    raise ValueError(f"cache_len={cache_len} is below prompt length {width} + max_new_tokens="
                     f"{max_new_tokens}; raise it or leave it None.")
  cache = model.init_cache(b, cache_len)
  tok, cache = prefill(variables, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos), cache,
                       jax.random.fold_in(key, 0))
  position = jnp.asarray(lengths)
  done = jnp.zeros((b,), bool)
  out = []
  for i in range(max_new_tokens):
    if eos_id is not None:
      tok = jnp.where(done, eos_id, tok)
      done = done | (tok == eos_id)
    out.append(tok)
    if i + 1 < max_new_tokens:
      tok, cache = step(variables, tok, position, cache, jax.random.fold_in(key, i + 1))
      position = position + 1
  out = jnp.stack(out, axis=1)  # [b, max_new_tokens]
  if eos_id is None:
    n = jnp.full((b,), max_new_tokens, jnp.int32)
  else:
    is_eos = out == eos_id
    n = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
  return out.astype(jnp.int32), n.astype(jnp.int32)
