"""linear_scan: every impl against the `reference` oracle (outputs, final state, all gradients)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops.scan import linear_scan
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

B, D = 2, 6  # D: the default trailing width; the grid also runs 16, 60 and 64
IMPLS = ("associative", "chunked")


def _inputs(seed, t, kind, dtype, with_init, dim=D):
  """a: mixed-sign real with exact zeros (resets), or complex |a| < 1 (LRU)."""
  rng = np.random.default_rng(seed)
  shape = (B, t, dim)
  if kind == "real":
    a = rng.uniform(-1.0, 1.0, shape)
    a[rng.random(shape) < 0.05] = 0.0
    x = rng.normal(size=shape)
    h0 = rng.normal(size=(B, dim)) if with_init else None
  else:
    a = rng.uniform(0.5, 0.999, shape) * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
    a[rng.random(shape) < 0.05] = 0.0
    x = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    h0 = (rng.normal(size=(B, dim)) + 1j * rng.normal(size=(B, dim))) if with_init else None
  if kind == "real":
    a, x = jnp.asarray(a, dtype), jnp.asarray(x, dtype)
    h0 = None if h0 is None else jnp.asarray(h0, jnp.float32)
  else:  # complex has no bf16: the compute dtype is complex64 either way
    a, x = jnp.asarray(a, jnp.complex64), jnp.asarray(x, jnp.complex64)
    h0 = None if h0 is None else jnp.asarray(h0, jnp.complex64)
  return a, x, h0


def _value_and_grads(impl, a, x, h0, chunk_size, seed):
  """Outputs, final state and the VJP of a random cotangent on both w.r.t. (a, x, h0)."""

  def f(a, x, h0):
    h, h_t = linear_scan(a, x, initial_state=h0, chunk_size=chunk_size, impl=impl)
    return h.astype(jnp.complex64 if jnp.iscomplexobj(h) else jnp.float32), h_t

  (h, h_t), vjp = jax.vjp(f, a, x, h0)
  rng = np.random.default_rng(seed + 1)
  cot_h = jnp.asarray(rng.normal(size=h.shape), h.dtype)
  cot_s = jnp.asarray(rng.normal(size=h_t.shape), h_t.dtype)
  grads = vjp((cot_h, cot_s))
  return (h, h_t), [g.astype(jnp.complex64 if jnp.iscomplexobj(g) else jnp.float32)
                    for g in grads if g is not None]


def _check(impl, t, kind, dtype, with_init, chunk_size, dim, seed=0):
  a, x, h0 = _inputs(seed, t, kind, dtype, with_init, dim)
  if h0 is None:  # differentiate w.r.t. a zero initial state too
    h0 = jnp.zeros((B, dim), jnp.complex64 if kind == "complex" else jnp.float32)
  out, grads = _value_and_grads(impl, a, x, h0, chunk_size, seed)
  ref_out, ref_grads = _value_and_grads("reference", a, x, h0, chunk_size, seed)
  rtol = RTOL[jnp.dtype(dtype).name] if kind == "real" else RTOL["float32"]
  # The reference runs on the same bf16-rounded inputs in float32, so both sides differ only
  # by float32 summation order before the final bf16 cast of h: float32 tolerance for the
  # state and the gradients, bf16 tolerance for the bf16 output.
  assert_rel_close(out[0], ref_out[0], rtol, f"{impl} h")
  assert_rel_close(out[1], ref_out[1], RTOL["float32"], f"{impl} h_T")
  for name, g, rg in zip(("da", "dx", "dh0"), grads, ref_grads):
    assert_rel_close(g, rg, RTOL["float32"] if name == "dh0" else rtol, f"{impl} {name}")


def test_reference_matches_float64_loop():
  a, x, h0 = _inputs(3, 37, "complex", jnp.float32, True)
  h, h_t = linear_scan(a, x, initial_state=h0, impl="reference")
  a64, x64, h = np.asarray(a, np.complex128), np.asarray(x, np.complex128), np.asarray(h)
  s = np.asarray(h0, np.complex128)
  want = []
  for t in range(a64.shape[1]):
    s = a64[:, t] * s + x64[:, t]
    want.append(s)
  assert_rel_close(h, np.stack(want, 1), RTOL["float32"], "h")
  assert_rel_close(h_t, s, RTOL["float32"], "h_T")


# One sampled combo per row covers every axis value at least once; the product is slow.
SAMPLED = [
    # impl, T, kind, dtype, with_init, chunk_size, dim
    ("associative", 1, "complex", jnp.float32, True, 16, 16),
    ("chunked", 1, "complex", jnp.float32, False, 64, D),
    ("chunked", 63, "real", jnp.float32, True, 16, 60),
    ("chunked", 100, "real", jnp.bfloat16, False, 64, 64),
    ("chunked", 1024, "complex", jnp.float32, True, 64, D),
    ("associative", 63, "real", jnp.bfloat16, True, 16, D),
]


@pytest.mark.parametrize("impl,t,kind,dtype,with_init,chunk_size,dim", SAMPLED)
def test_impl_matches_reference(impl, t, kind, dtype, with_init, chunk_size, dim):
  _check(impl, t, kind, dtype, with_init, chunk_size, dim)


@pytest.mark.slow
@pytest.mark.parametrize("impl,t,kind,dtype,with_init,chunk_size,dim", list(itertools.product(
    IMPLS, (1, 63, 100, 1024), ("real", "complex"), (jnp.float32, jnp.bfloat16),
    (False, True), (16, 64), (16, 60, 64))))
def test_impl_matches_reference_full(impl, t, kind, dtype, with_init, chunk_size, dim):
  if kind == "complex" and dtype == jnp.bfloat16:
    pytest.skip("complex inputs have no bfloat16 form")
  _check(impl, t, kind, dtype, with_init, chunk_size, dim)


@pytest.mark.parametrize("impl", ("reference",) + IMPLS)
def test_split_equals_whole(impl):
  a, x, h0 = _inputs(5, 100, "real", jnp.float32, True)
  h, h_t = linear_scan(a, x, initial_state=h0, chunk_size=16, impl=impl)
  h1, s1 = linear_scan(a[:, :37], x[:, :37], initial_state=h0, chunk_size=16, impl=impl)
  h2, s2 = linear_scan(a[:, 37:], x[:, 37:], initial_state=s1, chunk_size=16, impl=impl)
  assert_trees_rel_close((jnp.concatenate([h1, h2], 1), s2), (h, h_t), RTOL["float32"])


def test_zero_is_a_hard_reset():
  a, x, h0 = _inputs(6, 20, "real", jnp.float32, True)
  a = a.at[:, 10].set(0.0)
  for impl in ("reference",) + IMPLS:
    h, _ = linear_scan(a, x, initial_state=h0, chunk_size=8, impl=impl)
    fresh, _ = linear_scan(a[:, 10:], x[:, 10:], chunk_size=8, impl=impl)
    assert_rel_close(h[:, 10:], fresh, RTOL["float32"], impl)


def test_broadcast_and_dtypes():
  a = jnp.full((B, 9, 4, 1), 0.5, jnp.float32)  # one multiplier shared over the last axis
  x = jnp.ones((B, 9, 4, 3), jnp.bfloat16)
  h, h_t = linear_scan(a, x, impl="chunked", chunk_size=4)
  assert h.shape == (B, 9, 4, 3) and h.dtype == jnp.bfloat16
  assert h_t.shape == (B, 4, 3) and h_t.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(h_t), 2 * (1 - 0.5**9), rtol=1e-6)
  hc, hc_t = linear_scan(a.astype(jnp.complex64), x.astype(jnp.float32), impl="associative")
  assert hc.dtype == jnp.complex64 and hc_t.dtype == jnp.complex64


def test_jit_and_errors():
  a, x, h0 = _inputs(7, 33, "real", jnp.float32, True)
  f = jax.jit(lambda a, x, h0: linear_scan(a, x, initial_state=h0, chunk_size=16,
                                           impl="chunked"))
  assert_trees_rel_close(f(a, x, h0), linear_scan(a, x, initial_state=h0, impl="reference"),
                         RTOL["float32"])
  with pytest.raises(ValueError, match="unknown impl"):
    linear_scan(a, x, impl="cudnn")
  with pytest.raises(ValueError, match="initial_state"):
    linear_scan(a, x, initial_state=h0[:, :2])


def test_auto_resolves_per_platform_and_matches_reference():
  """`auto` is the reference on the CPU and the Pallas kernel on the GPU (`make test-gpu`
  runs this there, so the GPU's auto choice is compared with the oracle on its own backend)."""
  from seqmix.ops import scan as scan_mod
  assert scan_mod.AUTO["cpu"] == "reference" and scan_mod.AUTO["gpu"] == "pallas"
  a, x, h0 = _inputs(11, 100, "real", jnp.float32, True, 16)
  platform = jax.default_backend()
  chosen = scan_mod.AUTO.get(platform, scan_mod.AUTO["default"])
  out = linear_scan(a, x, initial_state=h0)
  assert_trees_rel_close(out, linear_scan(a, x, initial_state=h0, impl=chosen), 0.0,
                         f"auto vs {chosen}")   # the same form: bitwise equal
  assert_trees_rel_close(out, linear_scan(a, x, initial_state=h0, impl="reference"),
                         RTOL["float32"], "auto vs reference")


def test_auto_log_line_names_the_measurement(monkeypatch, caplog):
  """The GPU choice's log line quotes the measurement behind it (issue 8/9: auto says why)."""
  from seqmix.ops import _impl
  from seqmix.ops import scan as scan_mod
  monkeypatch.setattr(_impl, "platform", lambda: "gpu")
  monkeypatch.setattr(_impl, "_LOGGED", set())
  with caplog.at_level("INFO", logger="seqmix.ops"):
    assert _impl.resolve("linear_scan", "auto", scan_mod.IMPLS, scan_mod.AUTO) == "pallas"
  assert "'pallas' on gpu (H200" in caplog.text and "associative" in caplog.text
