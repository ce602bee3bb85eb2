"""The shape legend and jaxtyping aliases, in one place.

Letters used in shapes, docstrings and `# [b, t, h, d]` comments everywhere in seqmix:

    B  batch                     T  time (query length)      S  key/value length
    H  heads (of v / queries)    G  heads of k/q when grouped (H % G == 0)
    K  key (and query) dim       V  value dim                D  channels / model width
    N  state size of an SSM      L  convolution kernel length
    C  chunk size                M  MLP width                Vo vocabulary

Recurrent states are float32 `[B, H, K, V]` unless an op says otherwise.
"""

from typing import Any

import jax
from jaxtyping import Array, Bool, Complex, Float, Int, PyTree  # noqa: F401

Dtype = Any
Shape = tuple[int, ...]

# Activations.
Tokens = Int[Array, "B T"]
SegmentIds = Int[Array, "B T"]
Positions = Int[Array, "B T"]
Hidden = Float[Array, "B T D"]
Logits = Float[Array, "B T Vo"]

# Op inputs/outputs in the contract layout.
Q = Float[Array, "B T G K"]
Kx = Float[Array, "B T G K"]
Vx = Float[Array, "B T H V"]
Out = Float[Array, "B T H V"]
State = Float[Array, "B H K V"]
LogGate = Float[Array, "..."]  # None | [H] | [B,T,H] | [B,T,H,K], natural-log, <= 0

PRNGKey = jax.Array
