"""TTT-MLP (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden
States", arXiv:2407.04620): the TTT layer of `ttt_linear.TTTLayerBase` with a two-layer MLP as
the inner model, f(x) = x + LN(gelu_tanh(x W1 + b1) W2 + b2), hidden width 4K, through
`seqmix.ops.ttt.ttt_mlp`. The paper's base inner learning rate for TTT-MLP is 0.1; the inner
weights at the start of a sequence are parameters (W1, W2 N(0, 0.02²), b1, b2 zero, as the
official code).
"""

from seqmix import registry
from seqmix.mixers.ttt.ttt_linear import TTTLayerBase
from seqmix.ops import ttt as ttt_ops


@registry.register(
    "ttt_mlp", paper="Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
    year=2024, venue="arXiv", family="ttt", op="ttt.ttt_mlp", parents=("ttt_linear",),
    constant_state=True, test_kwargs={"num_heads": 2, "mini_batch": 4},
    url="https://arxiv.org/abs/2407.04620")
class TTTMLP(TTTLayerBase):
  """TTT-MLP layer.  x [B, T, D] -> y [B, T, D]; fields as `TTTLayerBase`, ttt_base_lr 0.1."""
  ttt_base_lr: float = 0.1

  def _weight_names(self):
    return ("W1", "b1", "W2", "b2")

  def _inner_shapes(self, k):
    m = ttt_ops.MLP_RATIO * k
    return ((k, m), (1, m), (m, k), (1, k))

  def _op(self):
    return ttt_ops.ttt_mlp

  def _fresh(self, weights, batch_size):
    return ttt_ops.mlp_state(*weights, batch_size)
