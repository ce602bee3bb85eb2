"""The logically-sharded square projection many mixers build their q / k / v / o from.

`axes.param` names the kernel's two logical axes (and the bias's output axis) so the mesh
rules shard it; a mixer calls this inside its `nn.compact` `__call__`, where Flax adopts the
new module as a child under `name`, so the parameter tree is the same as an inline
`nn.Dense`.
"""

import flax.linen as nn

from seqmix.parallel import axes


def sharded_dense(features: int, in_axis: str, out_axis: str, name: str, *, use_bias: bool,
                  dtype, param_dtype, kernel_init=nn.initializers.lecun_normal()) -> nn.Dense:
  """nn.Dense(features) with kernel [in_axis, out_axis] and bias [out_axis] logical axes."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=axes.param(kernel_init, in_axis, out_axis),
                  bias_init=axes.param(nn.initializers.zeros, out_axis))
