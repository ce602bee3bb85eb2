"""Which attention impl `auto` should pick on the GPU for windows and packed documents.

    PYTHONPATH=. python3 -m experiments.bench.attention_auto

cuDNN runs the plain causal (+ sliding window) pattern with its own masks, but segment ids
(packed documents) reach it as a dense [T, S] mask, and its windowed kernels may still visit
masked blocks. The Pallas flash kernel skips every invisible block (window and documents). This
times both, same run, bf16 B=8 H=16 D=128 (B=1 past T=16384), forward and forward+backward
(medians after warm-up), on:
  causal T=4096                       (the reference point: cuDNN is expected to win)
  window 512 at T=4096 / 16384
  segment ids at T=4096 / 16384       (documents of 512 tokens, causal)
  window 512 + segment ids, T=16384
and prints, per case, the faster impl and the ratio: the numbers `seqmix.ops.attention`'s
`auto` quotes. A benchmark, never a test.
"""

import time

import jax
import jax.numpy as jnp

from experiments.bench import _timing
from seqmix.ops import attention as attn

CASES = (  # label, T, window, document length (None: one document)
    ("causal", 4096, None, None),
    ("window 512", 4096, 512, None),
    ("window 512", 16384, 512, None),
    ("docs of 512", 4096, None, 512),
    ("docs of 512", 16384, None, 512),
    ("window 512 + docs of 2048", 16384, 512, 2048),
)


def _fns(impl, window, ids):
  def f(q, k, v):
    return attn.attention(q, k, v, causal=True, window=window, segment_ids=ids, impl=impl)[0]
  return jax.jit(f), jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))


def main():
  print(f"jax {jax.__version__}; {jax.devices()[0].device_kind}; bf16 H=16 D=128")
  print(f"{'case':<28}{'B':>3}{'T':>7}  {'cudnn fwd':>10}{'f+b':>9}  {'pallas fwd':>10}"
        f"{'f+b':>9}  verdict (f+b)")
  for label, t, window, doc in CASES:
    b = 8 if t <= 16384 else 1
    shape = (b, t, 16, 128)
    q, k, v, do = (jax.random.normal(jax.random.PRNGKey(i), shape, jnp.bfloat16)
                   for i in range(4))
    ids = None if doc is None else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) // doc,
                                                    (b, t))
    row = {}
    for impl in ("cudnn", "pallas"):
      t0 = time.perf_counter()
      try:
        fwd, fb = _fns(impl, window, ids)
        row[impl] = (_timing.median_ms(fwd, q, k, v, reps=20),
                     _timing.median_ms(fb, q, k, v, do, reps=20))
      except Exception as e:  # pylint: disable=broad-except
        row[impl] = None
        print(f"  {label} T={t} {impl} failed after {time.perf_counter() - t0:.0f}s: "
              f"{type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
    c, p = row["cudnn"], row["pallas"]
    cell = lambda r: "      —        —" if r is None else f"{r[0]:10.3f}{r[1]:9.3f}"
    if c and p:
      win = "pallas" if p[1] < c[1] else "cudnn"
      verdict = f"{win} ({max(c[1], p[1]) / min(c[1], p[1]):.2f}x)"
    else:
      verdict = "pallas (cudnn failed)" if p else "—"
    print(f"{label:<28}{b:>3}{t:>7}  {cell(c)}  {cell(p)}  {verdict}", flush=True)


if __name__ == "__main__":
  main()
