"""Griffin (De et al., "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
Language Models", arXiv 2024): the layer pattern (Hawk, Hawk, local MQA) repeated over the depth,
and its local multi-query attention mixer.

`local_mqa` is the `mha` mixer configured as Griffin's local attention block: one key/value head
(MQA), a sliding window (1024 tokens by default, as the paper; recurrentgemma's released models
use 2048), RoPE on the first half of each head's channels (`rope_fraction=0.5`, base 10000), no
projection biases. Decoding keeps a ring buffer of `window` slots (see `mha`). Deviations from
recurrentgemma's `LocalAttentionBlock`, all from reusing `mha`: projections are LeCun normal
(truncated) rather than plain normal, and the output projection has no bias and no
2/n_layers variance scaling.

Use the pattern by name: `mixer="griffin"` expands to hawk, hawk, local_mqa, hawk, ... (a depth
that is not a multiple of 3 ends part way through the pattern).
"""

from seqmix import registry
from seqmix.mixers.attention.mha import MHA
from seqmix.mixers.rnn import hawk  # noqa: F401  (registers "hawk" before the pattern)

GRIFFIN_PAPER = ("Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient "
                 "Language Models")


@registry.register(
    "local_mqa", paper=GRIFFIN_PAPER, year=2024, venue="arXiv", family="attention",
    op="attention.attention", parents=("mha", "mqa"), constant_state=False,
    test_kwargs={"num_heads": 4, "window": 4}, url="https://arxiv.org/abs/2402.19427")
class LocalMQA(MHA):
  """Griffin's local multi-query attention.  x [B, T, D] -> y [B, T, D].

  Every field is `mha`'s; the defaults differ: num_kv_heads=1, window=1024, rope_fraction=0.5.
  window must be >= 1; decoding keeps min(window, max_len) slots.
  """
  num_kv_heads: int | None = 1
  window: int | None = 1024
  rope_fraction: float = 0.5

  def _dims(self):
    if self.window is None:
      raise ValueError("local_mqa: window=None would be global attention; give the local "
                       "window (Griffin: 1024) or use the 'mha' mixer.")
    return super()._dims()


registry.register_pattern(
    "griffin", ("hawk", "hawk", "local_mqa"), paper=GRIFFIN_PAPER, year=2024, venue="arXiv",
    op="scan.linear_scan + attention.attention", parents=("hawk", "local_mqa"),
    url="https://arxiv.org/abs/2402.19427")
