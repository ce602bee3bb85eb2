"""minLSTM (Feng et al., "Were RNNs All We Needed?", arXiv 2024): an LSTM whose gates and
candidate depend on the input only, with normalised forget/input gates, as a parallel linear scan.

    f_t = σ(x_t W_f + b_f),  i_t = σ(x_t W_i + b_i),  h̃_t = g(x_t W_h + b_h)     [B, T, W]
    f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)       (time-independent scale of h)
    h_t = f'_t ⊙ h_{t−1} + i'_t ⊙ h̃_t                         (seqmix.ops.scan.linear_scan)
    y_t = h_t W_o  (only when W = expand·D != D)

g is the paper's positive activation (see `mingru`); the normalised gates are computed in log
space (log f' = log σ(a) − logaddexp(log σ(a), log σ(b))), as the paper's log-space form, so they
stay accurate when both gates are tiny. The scan itself runs directly (not in log space), which
gives the same h_t. Init, bias, h_0 = 0 and document resets as `mingru`.
"""

import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.rnn.mingru import MinRNNBase, candidate
from seqmix.parallel import axes


@registry.register(
    "minlstm", paper="Were RNNs All We Needed?", year=2024, venue="arXiv", family="linear-rnn",
    op="scan.linear_scan", parents=("lstm", "mingru"), constant_state=True, test_kwargs={},
    url="https://arxiv.org/abs/2410.01201", sequence_parallel=True)
class MinLSTM(MinRNNBase):
  """minLSTM.  x [B, T, D] -> y [B, T, D]. Fields: see `mingru.MinRNNBase`."""
  registry_name = "minlstm"

  def _gates(self, x, width):
    fih = self._dense(self.d_model, 3 * width, axes.EMBED, axes.HEADS, "in_proj")(x)
    f, i, h_tilde = jnp.split(fih.astype(jnp.float32), 3, axis=-1)      # [b, t, w] each
    log_f, log_i = jax.nn.log_sigmoid(f), jax.nn.log_sigmoid(i)
    log_sum = jnp.logaddexp(log_f, log_i)
    h_tilde = candidate(h_tilde, self.candidate_activation)
    return jnp.exp(log_f - log_sum), jnp.exp(log_i - log_sum) * h_tilde  # f'_t, i'_t h̃_t
