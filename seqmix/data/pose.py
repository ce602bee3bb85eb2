"""PoSE: positional skip-wise training (Zhu et al., ICLR 2024).

A training window of L_c tokens gets position ids that cover a target length L_t > L_c: the
window is cut into N chunks of lengths l_0 .. l_{N−1} (Σ l_i = L_c, each ≥ 1), chunk i starts
at st_i = l_0 + … + l_{i−1} and is shifted by a skip u_i,

    positions of chunk i = st_i + u_i, …, st_i + u_i + l_i − 1,
    u_0 = 0 ≤ u_1 ≤ … ≤ u_{N−1} ≤ L_t − L_c    (u_i drawn uniformly, then sorted),

so the ids are strictly increasing, start at 0, and end at most at L_t − 1; the relative
distances seen in training then span the whole target length while the window stays L_c
tokens. The tokens themselves stay the contiguous window (the paper found skipping text too
makes little difference). The paper's reference code uses N = 2 and draws the chunk cut
uniformly; so does this (`num_chunks`), with cut points drawn uniformly without repetition.

`pose_positions(rng, window, target_len, num_chunks)` -> int32 [window];
`PoseIterator(inner, target_len=, num_chunks=, seed=)` wraps a training iterator (batches
of dicts with "inputs" [B, T]) and adds "positions" [B, T]: batch n's positions come from
`numpy.random.default_rng((seed, n))`, so `get_state()` / `set_state()` resume exactly.
`pipeline.make_datasets` applies it to the training stream when `data.pose_target_len` is set.
"""

from typing import Any

import numpy as np


def _check(window: int, target_len: int, num_chunks: int):
  if window < 1:
    raise ValueError(f"PoSE window={window} must be >= 1.")
  if target_len < window:
    raise ValueError(f"PoSE target_len={target_len} must be >= the training window "
                     f"({window}); it is the context length the positions should cover.")
  if not 1 <= num_chunks <= window:
    raise ValueError(f"PoSE num_chunks={num_chunks} must be in [1, window={window}].")


def pose_positions(rng: np.random.Generator, window: int, target_len: int,
                   num_chunks: int = 2) -> np.ndarray:
  """Position ids [window] int32 for one PoSE training example (module docstring)."""
  _check(window, target_len, num_chunks)
  cuts = np.sort(rng.choice(np.arange(1, window), size=num_chunks - 1, replace=False))
  bounds = np.concatenate([[0], cuts, [window]])                      # chunk i: [b_i, b_{i+1})
  skips = np.concatenate([[0], np.sort(rng.integers(0, target_len - window + 1,
                                                    size=num_chunks - 1))])
  chunk_of = np.searchsorted(bounds, np.arange(window), side="right") - 1  # [window]
  return (np.arange(window) + skips[chunk_of]).astype(np.int32)


def pose_position_batch(seed, batch_size: int, window: int, target_len: int,
                        num_chunks: int = 2) -> np.ndarray:
  """[batch_size, window] int32 PoSE positions, a function of `seed` (an int or a tuple)."""
  rng = np.random.default_rng(seed)
  return np.stack([pose_positions(rng, window, target_len, num_chunks)
                   for _ in range(batch_size)])


class PoseIterator:
  """Adds PoSE "positions" [B, T] to every batch of a training iterator.

  Packed batches (with "segment_ids" or "positions" already) are refused: their positions
  restart per document, which PoSE as written does not define.
  """

  def __init__(self, inner, *, target_len: int, num_chunks: int = 2, seed: int = 0):
    self.inner, self.target_len, self.num_chunks, self.seed = inner, target_len, num_chunks, seed
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    batch = dict(next(self.inner))
    for key in ("segment_ids", "positions"):
      if key in batch:
        raise ValueError(f"PoSE (data.pose_target_len) needs unpacked windows; this batch has "
                         f"{key!r}. Use random windows (data.packed=False) of one document.")
    b, t = np.asarray(batch["inputs"]).shape
    batch["positions"] = pose_position_batch((self.seed, self.step), b, t, self.target_len,
                                             self.num_chunks)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"inner": self.inner.get_state(), "pose_step": self.step}

  def set_state(self, state: dict[str, Any]):
    self.inner.set_state(state["inner"])
    self.step = int(state["pose_step"])
