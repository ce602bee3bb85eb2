"""Fast forms vs the float32 reference on this machine's backend (default matmul precision).

  python -m experiments.bench.device_check [--T=256 --B=4]

The CPU tests check every fast form against its reference; this script repeats the check on
the accelerator, where float32 matmuls may run in TF32 and fused kernels differ, so a
numerical problem that only shows on the GPU/TPU is seen. It prints the relative error of the
output, the final state and the gradients of the inputs (sum of the output times a fixed
random cotangent) for realistic gates: weak (logsigmoid(N(0,1)) / 16, GLA's init) and strong
(logsigmoid(N(0,1)) / 0.05, about exp(-14) per token).
"""

import functools

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from seqmix.ops import delta_rule
from seqmix.ops import linear_attention
from seqmix.ops import mlstm
from seqmix.ops import scan
from seqmix.testing import rel_err

_T = flags.DEFINE_integer("T", 256, "Sequence length.")
_B = flags.DEFINE_integer("B", 4, "Batch size.")


def _cases(key, b, t):
  """(name, fn(impl, *args) -> (out, state), args) for each op and gate strength."""
  h, dk, dv = 4, 64, 64
  ks = jax.random.split(key, 8)
  q, k = (jax.random.normal(ks[i], (b, t, h, dk)) for i in range(2))
  v = jax.random.normal(ks[2], (b, t, h, dv))
  raw = jax.random.normal(ks[3], (b, t, h, dk))
  kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
  out = []
  for strength, div in (("weak", 16.0), ("strong", 0.05)):
    g_key = jax.nn.log_sigmoid(raw) / div
    g_head = g_key[..., 0]
    out += [
        (f"gla per-key {strength}", linear_attention.gla, (q, k, v, g_key)),
        (f"gla scalar {strength}", linear_attention.gla, (q, k, v, g_head)),
        (f"rwkv6 {strength}", lambda *a, impl: linear_attention.rwkv6(
            *a, 0.1 * jnp.ones((h, dk)), impl=impl), (q, k, v, g_key)),
        (f"gated delta {strength}", lambda *a, impl: delta_rule.delta_rule(*a, impl=impl),
         (q, kn, v, beta, g_head)),
        (f"mlstm {strength}", lambda *a, impl: mlstm.mlstm(*a, impl=impl),
         (q, k, v, raw[..., 1], g_head)),
    ]
  a = jnp.exp(jax.nn.log_sigmoid(raw[..., :8]) / 0.5)
  out.append(("linear_scan", lambda a, x, impl: scan.linear_scan(a, x, impl=impl),
              (a, q[..., :8])))
  return out


def main(argv):
  del argv
  key = jax.random.PRNGKey(0)
  print(f"device {jax.devices()[0].device_kind}; B={_B.value} T={_T.value}; relative errors "
        "of the fast form vs reference (float32)")
  print(f"{'op':<24} {'impl':<12} {'out':>9} {'state':>9} {'grads':>9}")
  for name, fn, args in _cases(key, _B.value, _T.value):
    for impl in ("chunked", "associative") if name == "linear_scan" else ("chunked",):
      res = {}
      for which in ("reference", impl):
        f = functools.partial(fn, impl=which)
        (o, s), vjp = jax.vjp(lambda *a, f=f: f(*a), *args)
        ct = (jax.random.normal(jax.random.PRNGKey(1), o.shape, o.dtype),
              jax.tree.map(jnp.zeros_like, s))
        res[which] = (o, s, vjp(ct))
      (o1, s1, g1), (o0, s0, g0) = res[impl], res["reference"]
      g_err = max(rel_err(x, y) for x, y in zip(g1, g0))
      print(f"{name:<24} {impl:<12} {rel_err(o1, o0):9.2e} {rel_err(jax.tree.leaves(s1)[0],
            jax.tree.leaves(s0)[0]):9.2e} {g_err:9.2e}", flush=True)


if __name__ == "__main__":
  app.run(main)
