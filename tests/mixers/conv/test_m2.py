"""M2 (causal): the parallel output against the float64 Hyena-form oracle (explicit O(T²) sums)
with the convolution run through Monarch products, and config errors. The Monarch DFT itself
(its factors against the DFT matrix, the conv against the direct sum) is tested in
tests/ops/test_monarch.py; the protocol by tests/mixers/test_protocol.py.
"""

import jax
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.testing import RTOL, assert_rel_close
from test_hyena import hyena_oracle  # same directory (pytest prepends it to sys.path)

TOL = RTOL["float32"]


@pytest.mark.parametrize("t,l_max", [(12, 64), (40, 48)])
def test_matches_direct_formula(t, l_max):
  m = mt.build("m2", l_max=l_max, long_conv_impl="monarch")
  x, p64, y, _ = mt.oracle_setup(m, t=t)
  assert_rel_close(y, hyena_oracle(p64, x, order=2, l_max=l_max), TOL, "m2 vs oracle")


@pytest.mark.parametrize("kw,match", [
    ({"long_conv_impl": "butterfly"}, "long_conv_impl='butterfly'"),
    ({"order": 1}, "order=1"),
])
def test_bad_config_raises(kw, match):
  m = mt.build("m2", **kw)
  with pytest.raises(ValueError, match=match):
    m.init(jax.random.key(0), mt.random_inputs(0, 1, 4))


def test_monarch_path_is_causal_up_to_round_off():
  """∂y_t/∂x_s for s > t is round-off only: ≤ 1e-5 of the largest within-past gradient (a
  future leak through the padded DFT would be O(1) relative). The exact-zero check of the
  protocol runs the direct sum (see the registry's test_kwargs)."""
  m = mt.build("m2", long_conv_impl="monarch")
  params = mt.init_params(m)
  x = mt.random_inputs(1, 1, 8)

  jac = jax.jit(jax.jacrev(lambda x_: m.apply({"params": params}, x_)[0][0].sum(-1)))(x)
  g = np.abs(np.asarray(jac))[:, 0].max(-1)                        # [t_out, s_in]
  future, past = np.triu(g, 1), np.tril(g, -1)
  assert past.max() > 0
  assert future.max() <= 1e-5 * past.max(), future.max() / past.max()


def test_monarch_decode_and_split_prefill_match_parallel():
  """Every cached call runs causal_conv(impl="monarch") from the past-input buffer."""
  m = mt.build("m2", long_conv_impl="monarch")
  runner = mt.Runner(m, mt.init_params(m))
  x = mt.random_inputs(0, 2, 13)
  mt.check_decode_matches_parallel(runner, x)
  mt.check_split_prefill(runner, x, 5)
