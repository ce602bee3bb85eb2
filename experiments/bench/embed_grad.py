"""Forward+backward of the token-embedding lookup: bfloat16 `jnp.take` vs `seqmix.models.embed`.

  python -m experiments.bench.embed_grad

Rows: a character vocabulary with real text's skew (tinyshakespeare ids, 65 rows, batch
64 × 256 as the shakespeare_char config) and a GPT-2 vocabulary (50257 rows, Zipf-distributed
ids, 8 × 2048). "bf16 take" is what `flax.linen.Embed(dtype=bfloat16)` differentiates into
(a bfloat16 scatter-add); "seqmix" is `embed.lookup` (float32 one-hot matmul or scatter-add).
The floor is reading the cotangent once and writing the float32 table gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from experiments.bench import _timing
from seqmix.data import corpora
from seqmix.models import embed


def _old(table, ids, g):
  rows = jnp.take(table.astype(jnp.bfloat16), ids, axis=0)
  return jnp.sum(rows.astype(jnp.float32) * g)


def _new(table, ids, g):
  rows = embed.lookup(table, ids).astype(jnp.bfloat16)
  return jnp.sum(rows.astype(jnp.float32) * g)


def _cases():
  chars = np.frombuffer(corpora.load_corpus("tinyshakespeare").encode(), np.uint8)
  _, char_ids = np.unique(chars, return_inverse=True)
  yield "chars, V=65, 64x256, D=384", 65, 384, char_ids[: 64 * 256].reshape(64, 256)
  zipf = np.random.default_rng(0).zipf(1.1, 8 * 2048) - 1
  yield "gpt2, V=50257, 8x2048, D=768", 50257, 768, np.minimum(zipf, 50256).reshape(8, 2048)


def main(argv):
  del argv
  print(f"device {jax.devices()[0].device_kind}")
  print("| case | bf16 take ms | seqmix ms | floor ms |")
  print("|---|---|---|---|")
  for name, v, d, ids in _cases():
    ids = jnp.asarray(ids, jnp.int32)
    table = jnp.asarray(np.random.default_rng(1).standard_normal((v, d)), jnp.float32)
    g = jnp.ones(ids.shape + (d,), jnp.float32)
    ms = []
    for fn in (_old, _new):
      grad = jax.jit(jax.grad(fn))
      ms.append(_timing.median_ms(grad, table, ids, g))
    floor = 1e3 * (g.size * 4 + table.size * 4) / _timing.bandwidth()
    print(f"| {name} | {ms[0]:.3f} | {ms[1]:.3f} | {floor:.3f} |")


if __name__ == "__main__":
  app.run(main)
