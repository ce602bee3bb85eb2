"""Samba (Ren et al., "Samba: Simple Hybrid State Space Models for Efficient Unlimited Context
Language Modeling", arXiv 2024 / ICLR 2025): the layer pattern (Mamba, sliding-window
attention) repeated over the depth, each layer followed by an MLP.

    mixer="samba", mlp="swiglu", n_layers=4 -> [mamba + MLP, samba_swa + MLP] × 2

which is the paper's Samba block (Mamba -> MLP -> SWA -> MLP, pre-norm residual, SwiGLU MLPs)
with one seqmix block per mixer. `samba_swa` is the `mha` mixer configured as Samba's
sliding-window attention: a window of 2048 tokens (keys a query sees, itself included), RoPE on
every channel, one key/value head per query head (the released Samba_421M config sets
n_query_groups = n_head), no projection biases. Decoding keeps a ring buffer of `window` slots
(see `mha`), so the pattern's decoding state is bounded (Mamba's fixed state + W KV slots).

Deviations, all from reusing `mha` and `mamba`: projections are LeCun normal (truncated) and
Mamba's as mamba_ssm, not Samba's own init; the paper's short-conv / dt details are those of the
seqmix `mamba` mixer.
"""

from seqmix import registry
from seqmix.mixers.attention.mha import MHA
from seqmix.mixers.ssm import mamba  # noqa: F401  (registers "mamba" before the pattern)

SAMBA_PAPER = ("Samba: Simple Hybrid State Space Models for Efficient Unlimited Context "
               "Language Modeling")
SAMBA_URL = "https://arxiv.org/abs/2406.07522"
PATTERN = ("mamba", "samba_swa")


@registry.register(
    "samba_swa", paper=SAMBA_PAPER, year=2024, venue="arXiv", family="attention",
    op="attention.attention", parents=("mha",), constant_state=False,
    test_kwargs={"num_heads": 4, "window": 4}, url=SAMBA_URL, sequence_parallel=True)
class SambaSWA(MHA):
  """Samba's sliding-window attention.  x [B, T, D] -> y [B, T, D].

      o_t = softmax_{t−W < s ≤ t}(Dh^-1/2 rope(q_t)·rope(k_s)) v_s,   y = o W_o

  Every field is `mha`'s; the default differs: window=2048. window must be >= 1 (None would be
  global attention: use `mha`); decoding keeps min(window, max_len) slots.
  """
  window: int | None = 2048

  def _dims(self):
    if self.window is None:
      raise ValueError("samba_swa: window=None would be global attention; give the sliding "
                       "window (Samba: 2048) or use the 'mha' mixer.")
    return super()._dims()


registry.register_pattern(
    "samba", PATTERN, paper=SAMBA_PAPER, year=2024, venue="arXiv",
    op="ssm.selective_scan + attention.attention", parents=("mamba", "samba_swa"),
    url=SAMBA_URL)
