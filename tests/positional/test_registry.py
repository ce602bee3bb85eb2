"""The positional registry: names, metadata, lineage, errors; the built-in components equal
the functions mha applies inline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers.attention.mha import MHA
from seqmix.positional import alibi, base, rope


def test_every_entry_has_paper_equation_and_sound_parents():
  for name in base.names():
    info = base.get(name)
    assert info.paper and 2017 <= info.year <= 2026, name
    assert len(info.equation.strip()) > 20, f"{name}: the class docstring holds its equation"
    for p in info.parents:
      assert p in base.names() and p != name, f"{name}: parent {p!r}"
      assert base.get(p).year <= info.year, f"{name}: parent {p!r} is younger"
  assert {"rope", "alibi", "none"} <= {n for n in base.names() if base.get(n).builtin}


def test_unknown_name_lists_registered_ones():
  with pytest.raises(ValueError, match=r"position='kerple'.*Did you mean.*Registered: .*t5"):
    base.get("kerple")
  with pytest.raises(NotImplementedError, match=r"position='3d_rpe'.*not built.*kerple_log"):
    base.get("3d_rpe")
  x = jnp.zeros((1, 4, 32))
  with pytest.raises(ValueError, match=r"position='learned'.*pos_embedding='learned'"):
    MHA(d_model=32, position="learned").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="position_kwargs"):
    MHA(d_model=32, position="rope", position_kwargs={"base": 3}).init(jax.random.key(0), x)


def test_builtin_components_equal_inline_functions():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 2000, (2, 5)), jnp.int32)
  comp = base.build("rope", num_heads=4, head_dim=8, rope_base=500.0, rope_fraction=0.5,
                    module_name=None)
  q2, k2 = comp.apply({}, q, k, pos, method="rotate")
  np.testing.assert_array_equal(q2, rope.apply_rope(q, pos, base=500.0, fraction=0.5))
  np.testing.assert_array_equal(k2, rope.apply_rope(k, pos, base=500.0, fraction=0.5))
  comp = base.build("alibi", num_heads=4, head_dim=8, module_name=None)
  np.testing.assert_array_equal(comp.apply({}, q, k, pos, pos, method="bias"),
                                alibi.alibi_bias(alibi.alibi_slopes(4), pos, pos))
