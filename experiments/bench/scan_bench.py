"""linear_scan and selective_scan: forward+backward time and peak memory per impl.

  python -m experiments.bench.scan_bench [--t=1024,4096,16384] [--impls=...]

B=8, D=2048 (N=16 for selective_scan), float32, T in --t. Each row: median ms of the jitted
forward, of forward+backward (grads of all inputs), XLA's compiled peak memory estimate
of forward+backward, and the memory-bound floor (bytes that must move / HBM bandwidth):
  linear_scan fwd      reads a, x, writes h                      3 BTD words
  linear_scan fwd+bwd  fwd + reads a, h, dh, writes da, dx       8 BTD words
  selective_scan fwd   reads u, Δ, B, C, writes y                3 BTD + 2 BTN words
  selective_scan f+b   fwd + reads u, Δ, B, C, dy, writes du, dΔ, dB, dC   8 BTD + 6 BTN
(float32 words; the parameter tensors A [D,N] and D [D] are negligible).
"""

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from experiments.bench import _timing
from seqmix.ops import scan
from seqmix.ops import ssm

_T = flags.DEFINE_list("t", ["1024", "4096", "16384"], "Sequence lengths.")
_LS_IMPLS = flags.DEFINE_list("linear_scan_impls", ["reference", "associative", "chunked"],
                              "linear_scan impls to time.")
_SS_IMPLS = flags.DEFINE_list("selective_scan_impls", ["reference", "chunked"],
                              "selective_scan impls to time.")
_B, _D, _N = 8, 2048, 16


def _row(name, impl, t, fwd, fb, args, floor_fwd_words, floor_fb_words):
  bw = _timing.bandwidth()
  try:
    ms_f = _timing.median_ms(fwd, *args)
    ms_fb = _timing.median_ms(fb, *args)
    mem = _timing.peak_bytes(fb, *args) / 2**30
    res = f"{ms_f:9.2f} {ms_fb:9.2f} {mem:9.2f}"
  except Exception as e:  # pylint: disable=broad-except
    res = f"{'failed: ' + type(e).__name__ + ': ' + str(e).splitlines()[0][:60]:>29}"
  floor_f = floor_fwd_words * 4 / bw * 1e3
  floor_fb = floor_fb_words * 4 / bw * 1e3
  print(f"{name:<15}{impl:<12}{t:>7} {res} {floor_f:9.2f} {floor_fb:9.2f}", flush=True)


def main(argv):
  del argv
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}; B={_B} D={_D} N={_N} float32; "
        f"floor at {_timing.bandwidth() / 1e12:.1f} TB/s")
  print(f"{'op':<15}{'impl':<12}{'T':>7} {'fwd ms':>9} {'f+b ms':>9} {'f+b GiB':>9} "
        f"{'floor f':>9} {'floor fb':>9}")
  key = jax.random.PRNGKey(0)
  for t in [int(x) for x in _T.value]:
    k1, k2 = jax.random.split(key)
    a = jax.random.uniform(k1, (_B, t, _D), jnp.float32, 0.5, 1.0)
    x = jax.random.normal(k2, (_B, t, _D), jnp.float32)
    btd = _B * t * _D
    for impl in _LS_IMPLS.value:
      fwd = jax.jit(lambda a, x, impl=impl: scan.linear_scan(a, x, impl=impl)[0])
      fb = jax.jit(jax.grad(lambda a, x, impl=impl: jnp.sum(scan.linear_scan(a, x, impl=impl)[0]),
                            argnums=(0, 1)))
      _row("linear_scan", impl, t, fwd, fb, (a, x), 3 * btd, 8 * btd)
    del a, x
    ks = jax.random.split(key, 5)
    u = jax.random.normal(ks[0], (_B, t, _D), jnp.float32)
    delta = jax.random.normal(ks[1], (_B, t, _D), jnp.float32) * 0.5 - 2.0
    A = -jnp.broadcast_to(jnp.arange(1, _N + 1, dtype=jnp.float32), (_D, _N))
    Bm = jax.random.normal(ks[2], (_B, t, _N), jnp.float32)
    Cm = jax.random.normal(ks[3], (_B, t, _N), jnp.float32)
    btn = _B * t * _N
    for impl in _SS_IMPLS.value:
      def f(u, delta, Bm, Cm, impl=impl):
        return ssm.selective_scan(u, delta, A, Bm, Cm, delta_softplus=True, impl=impl)[0]
      fwd = jax.jit(f)
      fb = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a)), argnums=(0, 1, 2, 3)))
      _row("selective_scan", impl, t, fwd, fb, (u, delta, Bm, Cm),
           3 * btd + 2 * btn, 8 * btd + 6 * btn)
    del u, delta, Bm, Cm


if __name__ == "__main__":
  app.run(main)
