"""A float64 NumPy oracle for sparse-pattern attention: explicit masked softmax, one (query,
key) pair at a time, from MHA-style params (RoPE at the positions within the document).

`patterns`: a list of rules rule(h, i_pos, j_pos) -> bool. Each rule is a softmax over its
keys; several are combined weighted by their denominators (LongNet):
    o_i = Σ_r Σ_{j ∈ A_r(i)} exp(l_ij) v_j / Σ_r Σ_{j ∈ A_r(i)} exp(l_ij)
(a key in two rules counts twice), which for one rule is the plain masked softmax.
"""

import numpy as np

from _remapped_oracle import rope64


def sparse_attention(params, x, patterns, positions=None, segment_ids=None, rope=True):
  p = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  q = np.einsum("btd,dhk->bthk", x, p["q_proj"])
  k = np.einsum("btd,dgk->btgk", x, p["k_proj"])
  v = np.einsum("btd,dgk->btgk", x, p["v_proj"])
  h, g, dh = q.shape[2], k.shape[2], q.shape[3]
  pos = np.arange(t)[None].repeat(b, 0) if positions is None else np.asarray(positions)
  seg = np.zeros((b, t), int) if segment_ids is None else np.asarray(segment_ids)
  rot = (lambda u, _p: rope64(u, _p)) if rope else (lambda u, _p: u)
  o = np.zeros((b, t, h, dh))
  for bi in range(b):
    for hi in range(h):
      gi = hi // (h // g)
      for i in range(t):
        num, den, logits, vals = 0.0, 0.0, [], []
        for rule in patterns:
          for j in range(i + 1):
            if seg[bi, j] != seg[bi, i] or not rule(hi, int(pos[bi, i]), int(pos[bi, j])):
              continue
            logits.append(rot(q[bi, i, hi], pos[bi, i]) @ rot(k[bi, j, gi], pos[bi, j])
                          / np.sqrt(dh))
            vals.append(v[bi, j, gi])
        w = np.exp(np.array(logits) - max(logits))
        o[bi, i, hi] = (w[:, None] * np.array(vals)).sum(0) / w.sum()
  return np.einsum("bthk,hkd->btd", o, p["o_proj"])
