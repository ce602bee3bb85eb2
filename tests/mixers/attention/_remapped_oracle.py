"""A float64 NumPy oracle for attention whose RoPE positions depend on the (query, key) pair:
`pair_positions(i_pos, j_pos) -> (query position, key position)`, or None where the key is
not visible, written per test from the paper's rule and evaluated one pair at a time (no
masks, no lse merge)."""

import numpy as np


def rope64(x, p, base=10000.0):
  """Rotate-half RoPE of one head vector x [Dh] at position p, float64."""
  d = x.shape[-1]
  theta = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
  c, s = np.cos(p * theta), np.sin(p * theta)
  x1, x2 = x[: d // 2], x[d // 2:]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s])


def remapped_attention(params, x, pair_positions, positions=None, segment_ids=None):
  """y [B,T,D] float64 from MHA-style params (q/k/v/o_proj kernels) and x [B,T,D]."""
  p = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  q = np.einsum("btd,dhk->bthk", x, p["q_proj"])
  k = np.einsum("btd,dgk->btgk", x, p["k_proj"])
  v = np.einsum("btd,dgk->btgk", x, p["v_proj"])
  h, g, dh = q.shape[2], k.shape[2], q.shape[3]
  pos = np.arange(t)[None].repeat(b, 0) if positions is None else np.asarray(positions)
  seg = np.zeros((b, t), int) if segment_ids is None else np.asarray(segment_ids)
  o = np.zeros((b, t, h, dh))
  for bi in range(b):
    for hi in range(h):
      gi = hi // (h // g)
      for i in range(t):
        keys, logits = [], []
        for j in range(i + 1):
          pair = pair_positions(int(pos[bi, i]), int(pos[bi, j]))
          if seg[bi, j] != seg[bi, i] or pair is None:
            continue
          keys.append(j)
          logits.append(rope64(q[bi, i, hi], pair[0]) @ rope64(k[bi, j, gi], pair[1])
                        / np.sqrt(dh))
        w = np.exp(np.array(logits) - max(logits))
        w /= w.sum()
        o[bi, i, hi] = sum(wj * v[bi, j, gi] for wj, j in zip(w, keys))
  return np.einsum("bthk,hkd->btd", o, p["o_proj"])
