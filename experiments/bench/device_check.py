"""Fast forms vs the float32 reference on this machine's backend; PASS/FAIL per row.

  PYTHONPATH=. python3 -m experiments.bench.device_check [--T=256 --B=4] [--only=attention]

The CPU tests check every fast form against its reference; this script repeats the check on
the accelerator, where float32 matmuls run in TF32 by default and fused kernels (cuDNN, later
Pallas) differ, so a numerical problem that only shows there is seen. Per row it prints the
relative error (‖a − b‖ / ‖b‖, see seqmix.testing.rel_err) of every output (for attention o
and, for `blockwise_attention`, lse over its finite entries; for the recurrent ops the output
and the final state) and the largest one over the gradients of the inputs (the VJP of a fixed
random cotangent on the first output), then PASS or FAIL against the row's dtype tolerance.
It exits with status 1 if any row fails.

What runs: `IMPLS`, a table op -> impls compared with `reference` (every GPU `auto` choice is
in it). An impl that raises seqmix's NotImplementedError ("not implemented yet": `pallas`
today) is printed as SKIP, so a newly built kernel is checked here with no edit. `cudnn` on a
machine without a GPU is a SKIP too. Rows an impl refuses by contract (cuDNN: odd lengths with
a mask) are listed in `expect_refusal` and PASS only if they raise the op's clear error.

The reference runs at full float32 matmul precision (`jax.default_matmul_precision`
"highest"), the fast form at the backend's default, so the error is the fast form's own.
Gates for the linear-attention ops: weak (logsigmoid(N(0,1)) / 16, GLA's init) and strong
(logsigmoid(N(0,1)) / 0.05, about exp(-14) per token).

Imports only jax, numpy, absl and seqmix.ops / seqmix.testing (no grain, no ml_collections),
so the device's plain python3 runs it.
"""

import dataclasses
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from seqmix.ops import attention
from seqmix.ops import conv
from seqmix.ops import delta_rule
from seqmix.ops import linear_attention
from seqmix.ops import mlstm
from seqmix.ops import rwkv4
from seqmix.ops import scan
from seqmix.ops import slstm
from seqmix.ops import ssm
from seqmix.ops import ttt
from seqmix.testing import RTOL
from seqmix.testing import rel_err

_T = flags.DEFINE_integer("T", 256, "Sequence length (attention: keys of the long cases).")
_B = flags.DEFINE_integer("B", 4, "Batch size.")
_ONLY = flags.DEFINE_list("only", [], "Check only these ops (names of IMPLS); default all.")
_CASE = flags.DEFINE_list("case", [], "Check only cases whose name contains one of these "
                          "substrings; default all.")
_DTYPE = flags.DEFINE_list("dtype", [], "Check only these dtypes (bfloat16, float32); default all.")
_BLOCK_K = flags.DEFINE_integer(
    "block_k", 64, "attention.CHUNK_BLOCK_K for the chunked attention rows (the library's 512 "
    "would make T = 256 one block; 64 runs several, the last one ragged at T = 255).")

# op -> impls checked against "reference" on this backend. `pallas` is listed wherever the op's
# contract names it: until it is built it raises NotImplementedError (SKIP); then it is checked.
IMPLS = {
    "attention": ("cudnn", "xla", "chunked", "pallas"),
    "blockwise_attention": ("chunked", "pallas"),
    "gla": ("chunked", "pallas"),
    "rwkv6": ("chunked", "pallas"),
    "delta_rule": ("chunked", "pallas"),
    "mlstm": ("chunked", "pallas"),
    "linear_scan": ("chunked", "associative", "pallas"),   # GPU auto: associative
    "selective_scan": ("chunked", "pallas"),
    "rwkv4": ("chunked", "pallas"),
    "ttt_linear": ("chunked", "pallas"),
    "ttt_mlp": ("chunked", "pallas"),
    "slstm": ("pallas",),                                   # reference only until pallas
    "causal_conv": ("fft",),                                # auto: fft for long kernels
}
# Impls that take only some dtypes: others are not rows (they would only test the refusal).
DTYPES_OF_IMPL = {"cudnn": ("bfloat16", "float16")}

# Relative tolerance by dtype. float32 on an accelerator: XLA's default matmul precision there
# is TF32 (inputs rounded to 10 mantissa bits, unit roundoff 2^-11 = 4.9e-4) against a
# full-precision reference; the chunked forms measured 3–5e-4 on the H100 (README), so 2e-3
# is 4x the TF32 rounding of one operand, and an algorithmic error (O(1e-2) and up) still fails.
# On the CPU default precision is full float32: the tests' 1e-5, widened to 1e-4 for the
# longer sequences and strong gates here (float32 summation over T = 256 steps).
F32_RTOL_ACCEL = 2e-3
F32_RTOL_CPU = 1e-4


def _rtol(dtype):
  if dtype == "float32":
    return F32_RTOL_CPU if jax.default_backend() == "cpu" else F32_RTOL_ACCEL
  return RTOL[dtype]


@dataclasses.dataclass
class Case:
  op: str                       # a key of IMPLS
  name: str
  fn: Callable[..., Any]        # fn(*args, impl=...) -> (first output, rest: any pytree)
  args: tuple                   # differentiated positional arguments
  dtype: str = "float32"
  expect_refusal: tuple = ()    # impls that must raise RuntimeError/ValueError on this case


def _attention_cases(key, b, t):
  """`attention` and `blockwise_attention` over the contract's mask combinations."""
  out = []
  d = 64
  tq = max(2, t // 4)   # the short query block (64 at T = 256)
  for dtype in ("bfloat16", "float32"):
    dt = jnp.dtype(dtype)

    def qkv(tq, s, h, g, dk=d, seed=0):
      ks = jax.random.split(jax.random.fold_in(key, seed), 3)
      return (jax.random.normal(ks[0], (b, tq, h, dk)).astype(dt),
              jax.random.normal(ks[1], (b, s, g, dk)).astype(dt),
              jax.random.normal(ks[2], (b, s, g, dk)).astype(dt))

    def ids(n, seed, docs=3):
      r = jax.random.randint(jax.random.fold_in(key, 100 + seed), (b, n), 0, docs)
      return jnp.sort(r, axis=1).astype(jnp.int32)   # packed documents

    def att(**kw):
      return lambda q, k, v, impl: attention.attention(q, k, v, impl=impl, **kw)

    def blk(**kw):
      return lambda q, k, v, impl: attention.blockwise_attention(q, k, v, impl=impl, **kw)

    ids_t = ids(t, 0)
    ids_q = jnp.tile((jnp.arange(tq) % 4)[None], (b, 1))       # id 3: no key -> empty rows
    ids_k = jnp.tile((jnp.arange(t) % 3)[None], (b, 1))
    bias = jax.random.normal(jax.random.fold_in(key, 7), (1, 8, t, t), jnp.float32)
    a = "attention"
    out += [
        Case(a, "causal MHA", att(), qkv(t, t, 8, 8), dtype),
        Case(a, "causal GQA 8/2", att(), qkv(t, t, 8, 2), dtype),
        Case(a, "causal MQA 8/1 d=128", att(), qkv(t, t, 8, 1, dk=128), dtype),
        Case(a, "noncausal cross S=2T", att(causal=False), qkv(t, 2 * t, 8, 2), dtype),
        Case(a, "window T/4 GQA", att(window=t // 4), qkv(t, t, 8, 2), dtype),
        Case(a, "segment ids GQA", att(segment_ids=ids_t), qkv(t, t, 8, 2), dtype),
        Case(a, "segment ids + window T/5", att(segment_ids=ids_t, window=t // 5),
             qkv(t, t, 8, 8), dtype),
        Case(a, "bias [1,H,T,S] + window", att(bias=bias, window=t // 2), qkv(t, t, 8, 2), dtype),
        Case(a, "short query block (end)", att(), qkv(tq, t, 8, 2), dtype),
        Case(a, "short query + segment pair", att(segment_ids=(ids(tq, 1), ids(t, 2))),
             qkv(tq, t, 8, 2), dtype),
        Case(a, "q_offset=T/8 window T/8", att(q_offset=t // 8, window=t // 8),
             qkv(tq, t, 8, 2), dtype),
        Case(a, "empty rows: q_offset=-T/16", att(q_offset=-(t // 16)), qkv(tq, t, 8, 2), dtype),
        Case(a, "empty rows: segment ids", att(causal=False, segment_ids=(ids_q, ids_k)),
             qkv(tq, t, 8, 2), dtype),
        # One decoding query: cuDNN refuses odd T with a mask (its backward pass).
        Case(a, "decode T=1", att(), qkv(1, t, 8, 2), dtype, expect_refusal=("cudnn",)),
        Case(a, "odd T=255 + segment ids", att(segment_ids=ids_t[:, :t - 1]),
             qkv(t - 1, t - 1, 8, 2), dtype, expect_refusal=("cudnn",)),
    ]
    bw = "blockwise_attention"
    out += [
        Case(bw, "causal GQA", blk(), qkv(t, t, 8, 2), dtype),
        Case(bw, "window + segment ids MQA", blk(window=t // 5, segment_ids=ids_t),
             qkv(t, t, 8, 1), dtype),
        Case(bw, "noncausal cross + bias", blk(causal=False, bias=bias[..., :tq, :]),
             qkv(tq, t, 8, 2), dtype),
        # Queries at T/8.., keys at T/4..: the first T/8 queries see no key of this block.
        Case(bw, "offsets, empty rows", blk(q_offset=t // 8, kv_offset=t // 4, window=t // 8),
             qkv(tq, t, 8, 2), dtype),
        Case(bw, "segment pair, empty rows", blk(causal=False, segment_ids=(ids_q, ids_k)),
             qkv(tq, t, 8, 2), dtype),
    ]
  return out


def _recurrent_cases(key, b, t):
  """The linear-attention, scan, SSM, TTT, RWKV-4, sLSTM and conv ops (float32)."""
  h, dk, dv = 4, 64, 64
  ks = jax.random.split(key, 12)
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
        Case("gla", f"per-key gate {strength}", lambda *a, impl: linear_attention.gla(
            *a, impl=impl), (q, k, v, g_key)),
        Case("gla", f"scalar gate {strength}", lambda *a, impl: linear_attention.gla(
            *a, impl=impl), (q, k, v, g_head)),
        Case("rwkv6", strength, lambda *a, impl: linear_attention.rwkv6(
            *a, 0.1 * jnp.ones((h, dk)), impl=impl), (q, k, v, g_key)),
        Case("delta_rule", f"gated {strength}", lambda *a, impl: delta_rule.delta_rule(
            *a, impl=impl), (q, kn, v, beta, g_head)),
        Case("mlstm", strength, lambda *a, impl: mlstm.mlstm(*a, impl=impl),
             (q, k, v, raw[..., 1], g_head)),
    ]
  a = jnp.exp(jax.nn.log_sigmoid(raw[..., :8]) / 0.5)
  out.append(Case("linear_scan", "real", lambda a, x, impl: scan.linear_scan(a, x, impl=impl),
                  (a, q[..., :8])))
  # selective_scan: D = 32 channels, N = 16 states, Mamba's A = -exp(A_log) and softplus(Δ).
  d_ch, n = 32, 16
  u = jax.random.normal(ks[5], (b, t, d_ch))
  delta = jax.random.normal(ks[6], (b, t, d_ch)) - 2.0
  a_ssm = -jnp.exp(jax.random.normal(ks[7], (d_ch, n)) * 0.5)
  bc = jax.random.normal(ks[8], (b, t, 2, n))
  out.append(Case("selective_scan", "softplus, D", lambda u, dl, bb, cc, impl: ssm.selective_scan(
      u, dl, a_ssm, bb, cc, jnp.ones((d_ch,)), delta_softplus=True, impl=impl),
      (u, delta, bc[:, :, 0], bc[:, :, 1])))
  w4 = -jnp.exp(jax.random.normal(ks[9], (d_ch,)))
  out.append(Case("rwkv4", "wkv", lambda k4, v4, impl: rwkv4.wkv(w4, 0.5 * jnp.ones(d_ch), k4, v4,
                                                                 impl=impl), (u, delta)))
  hd = 16   # TTT head width (the paper's 64 is slow in the float32 reference scan)
  tq, tk, tv = (x[..., :hd] for x in (q, k, v))
  eta = 0.1 * jax.nn.sigmoid(raw[..., 2])
  ln_w, ln_b = jnp.ones((h, hd)), jnp.zeros((h, hd))
  for name, op in (("ttt_linear", ttt.ttt_linear), ("ttt_mlp", ttt.ttt_mlp)):
    out.append(Case(name, "mini_batch 16", lambda q_, k_, v_, e_, impl, op=op: op(
        q_, k_, v_, e_, ln_w, ln_b, impl=impl), (tq, tk, tv, eta)))
  x_gates = jax.random.normal(ks[10], (b, t, 4, h, 8))   # [b, t, gates z i f o, h, dh]
  r = 0.1 * jax.random.normal(ks[11], (4, h, 8, 8))
  out.append(Case("slstm", "sigmoid forget", lambda x, impl: slstm.slstm(
      x, r, jnp.zeros((4, h, 8)), impl=impl), (x_gates,)))
  out.append(Case("causal_conv", "64 taps", lambda u_, k_, impl: conv.causal_conv(
      u_, k_, impl=impl), (u, jax.random.normal(ks[11], (64, d_ch)) / 8.0)))
  return out


def _compare(a, b):
  """rel_err over the entries finite in both; inf when the finite patterns differ."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  fa, fb = np.isfinite(a), np.isfinite(b)
  if a.shape != b.shape or not np.array_equal(fa, fb):
    return float("inf")
  if not np.array_equal(a[~fa], b[~fb]):   # -inf where the reference has -inf (empty rows)
    return float("inf")
  return rel_err(a[fa], b[fb])


def _run(case, impl):
  """(outputs, grads) of one impl: all output leaves and the VJP of a random cotangent."""
  def f(*args):
    first, rest = case.fn(*args, impl=impl)
    return first, rest

  (first, rest), vjp = jax.vjp(f, *case.args)
  ct = jax.random.normal(jax.random.PRNGKey(1), first.shape, jnp.float32).astype(first.dtype)
  grads = vjp((ct, jax.tree.map(jnp.zeros_like, rest)))
  return [first] + jax.tree.leaves(rest), list(grads)


def _row(case, impl, ref):
  """One printed row; returns "PASS" | "FAIL" | "SKIP"."""
  label = f"{case.op:<20} {impl:<12} {case.dtype:<9} {case.name:<30}"
  try:
    outs, grads = _run(case, impl)
    jax.block_until_ready((outs, grads))
  except NotImplementedError as e:
    if "not implemented yet" in str(e):   # seqmix's resolve: the impl is not built
      print(f"{label} SKIP  not built", flush=True)
      return "SKIP"
    print(f"{label} FAIL  NotImplementedError: {e}", flush=True)
    return "FAIL"
  except (RuntimeError, ValueError) as e:
    if impl == "cudnn" and jax.default_backend() != "gpu":
      print(f"{label} SKIP  no GPU", flush=True)
      return "SKIP"
    if impl in case.expect_refusal:
      print(f"{label} PASS  refused as documented: {str(e)[:90]}", flush=True)
      return "PASS"
    print(f"{label} FAIL  {type(e).__name__}: {e}", flush=True)
    return "FAIL"
  if impl in case.expect_refusal:
    print(f"{label} FAIL  ran, but the op documents a refusal here", flush=True)
    return "FAIL"
  ref_outs, ref_grads = ref
  errs = [_compare(x, y) for x, y in zip(outs, ref_outs)]
  g_err = max(_compare(x, y) for x, y in zip(grads, ref_grads))
  tol = _rtol(case.dtype)
  verdict = "PASS" if max(errs + [g_err]) <= tol else "FAIL"
  outs_s = " ".join(f"{e:9.2e}" for e in errs[:2]).ljust(19)
  print(f"{label} {verdict}  out {outs_s} grads {g_err:9.2e}  (rtol {tol:.0e})", flush=True)
  return verdict


def main(argv):
  del argv
  key = jax.random.PRNGKey(0)
  b, t = _B.value, _T.value
  attention.CHUNK_BLOCK_K = _BLOCK_K.value
  unknown = set(_ONLY.value) - set(IMPLS)
  if unknown:
    raise app.UsageError(f"--only: unknown ops {sorted(unknown)}; choose from {list(IMPLS)}.")
  print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}); jax {jax.__version__};"
        f" B={b} T={t} attention block_k={_BLOCK_K.value}; relative error vs the float32 "
        "reference (highest precision)")
  print(f"{'op':<20} {'impl':<12} {'dtype':<9} {'case':<30} verdict  errors")
  cases = _attention_cases(key, b, t) + _recurrent_cases(key, b, t)
  tally = {"PASS": 0, "FAIL": 0, "SKIP": 0}
  failed = []
  for case in cases:
    if _ONLY.value and case.op not in _ONLY.value:
      continue
    if _CASE.value and not any(c in case.name for c in _CASE.value):
      continue
    if _DTYPE.value and case.dtype not in _DTYPE.value:
      continue
    try:
      with jax.default_matmul_precision("highest"):
        ref = _run(case, "reference")
    except Exception as e:  # pylint: disable=broad-except  (report it as a row, go on)
      print(f"{case.op:<20} {'reference':<12} {case.dtype:<9} {case.name:<30} FAIL  "
            f"{type(e).__name__}: {e}", flush=True)
      tally["FAIL"] += 1
      failed.append(f"{case.op}/reference/{case.dtype}/{case.name}")
      continue
    for impl in IMPLS[case.op]:
      if case.dtype not in DTYPES_OF_IMPL.get(impl, (case.dtype,)):
        continue
      verdict = _row(case, impl, ref)
      tally[verdict] += 1
      if verdict == "FAIL":
        failed.append(f"{case.op}/{impl}/{case.dtype}/{case.name}")
  print(f"{tally['PASS']} PASS, {tally['FAIL']} FAIL, {tally['SKIP']} SKIP")
  if failed:
    print("FAILED: " + "; ".join(failed))
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
