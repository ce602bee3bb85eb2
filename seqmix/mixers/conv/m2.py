"""M2, causal form (Fu et al., "Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture",
NeurIPS 2023): the M2-GPT sequence mixer.

M2 mixes along the sequence with Monarch matrices. Its causal language-model mixer is a gated
long convolution with implicit filters (Hyena's, `seqmix.mixers.conv.hyena`), where the
convolution is computed as Monarch products: the causal conv of the T inputs with the L-tap
filter is a zero-padded circular convolution of length n >= T + L - 1 (the paper's
polynomial-evaluation argument for causality: with the upper half zero, the product of the two
padded polynomials has no wrap-around), and each DFT of length n = n1·n2 is the Monarch product

    F_n = P_out (I_{n1} ⊗ F_{n2}) P_mid Tw (I_{n2} ⊗ F_{n1}) P_in       (`seqmix.ops.monarch`)

two block-diagonal matmuls with a diagonal twiddle between them (O(n^{3/2}) matmul work per
channel). The mixer (order N = 2 by default):

    (x_0, x_1, v) = split_3(ShortConv_3(x W_in + b_in))
    y = (x_0 ⊙ (h * (x_1 ⊙ v) + β ⊙ x_1 ⊙ v)) W_out + b_out,
    (h * u) = Re F_n^{-1}(F_n pad(h) ⊙ F_n pad(u))[:T]   with F_n the Monarch product above.

Decoding, packed documents and the filter cache are Hyena's (`causal_conv(impl="monarch")` with
the cached past inputs as its initial state; masked taps across documents). Not built: M2's
Monarch MLP (the channel mixer: block-diagonal GLU) belongs to the block's MLP, and M2-BERT's
bidirectional residual long conv does not apply to the causal form.
"""

from seqmix import registry
from seqmix.mixers.common import long_conv as lc
from seqmix.mixers.conv.hyena import Hyena

_LONG_IMPLS = ("monarch", "fft", "reference", "auto")


@registry.register(
    "m2", paper="Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture", year=2023,
    venue="NeurIPS", family="long-conv",
    op="conv.causal_conv (monarch: Monarch-factored DFT, implicit filters) + "
       "conv.causal_conv (short)",
    parents=("hyena", "monarch"), constant_state=False,
    # The shared causality check asks for exactly zero ∂y_t/∂x_s (s > t); a DFT-based conv
    # leaves float32 round-off (~1e-7 relative) at future positions, so the protocol runs the
    # direct sum ("auto" at its short T). The Monarch path is tested against the explicit
    # O(T²) formula and for approximate causality in tests/mixers/conv/test_m2.py, and against
    # the reference conv (outputs, state, gradients) in tests/ops/test_monarch.py.
    test_kwargs={"l_max": 64, "filter_order": 16, "long_conv_impl": "auto"})
class M2(Hyena):
  """M2-GPT sequence mixer.  x [B, T, D] -> y [B, T, D].

  All Hyena fields (order, l_max, the filter FFN and decay window, short_conv_size) plus
  long_conv_impl: `causal_conv` impl of the long convolutions: "monarch" (M2's Monarch DFT),
    or "fft" / "reference" / "auto" for comparison (conv_impl stays the short conv's impl).
  """
  long_conv_impl: str = "monarch"

  def _check(self):
    super()._check()
    if self.long_conv_impl not in _LONG_IMPLS:
      raise ValueError(f"long_conv_impl={self.long_conv_impl!r} is not one of {_LONG_IMPLS}.")

  def _conv(self, u, k, segment_ids, cache):
    return lc.long_conv(u, k, segment_ids=segment_ids, cache=cache, impl=self.long_conv_impl)
