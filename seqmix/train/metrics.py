"""Training metrics: bits per token, throughput, parameter counts, MFU, and their writers.

MFU (model FLOPs utilisation), as nanoGPT's estimate_mfu / PaLM appendix B:

    flops_per_token = 6 * N + 12 * L_attn * d_model * T

N: parameters minus learned position embeddings (a lookup does no matmul; the token
embedding stays in N because the tied head multiplies by it). 6 = 2 (multiply-add) x 3
(forward + backward). 12 * L_attn * d_model * T: the softmax-attention score and value
matmuls (QK^T and AV, 2 x 2 * d_model * T flops per token forward, x3 with backward) for
each of the L_attn softmax-attention layers, counted over the full T as nanoGPT does (the
causal half is not subtracted). Other mixers' state/recurrence flops beyond their
parameters are not counted, so their MFU is a lower bound.

    MFU = flops_per_token * tokens_per_second / peak

peak: the device's dense bf16 tensor-core rate (H100 SXM 989 TFLOP/s, A100 312 TFLOP/s);
on CPU (or an unknown device) MFU is reported as n/a.
"""

import math
import re
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

LN2 = math.log(2.0)

# Dense bf16 peak FLOP/s by substring of `jax.Device.device_kind`. H200 has H100 SXM's
# compute (it differs in memory). H100 PCIe's peak is lower (756 TFLOP/s) and is
# matched first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)

_POSITION_PATTERN = re.compile(r"pos", re.IGNORECASE)


def bits_per_token(loss_nats: float) -> float:
  """Cross-entropy in nats -> bits (per char for char-level, per byte for byte-level)."""
  return loss_nats / LN2


def param_count(params) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def matmul_param_count(params) -> int:
  """Parameters minus learned position embeddings (paths containing 'pos')."""
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not _POSITION_PATTERN.search(jax.tree_util.keystr(path)):
      total += int(np.prod(np.shape(x)))
  return total


def flops_per_token(n_matmul_params: int, *, n_attention_layers: int, d_model: int,
                    seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token; formula in the module docstring."""
  return 6.0 * n_matmul_params + 12.0 * n_attention_layers * d_model * seq_len


def count_attention_layers(model_cfg: Any) -> int:
  """Softmax-attention layers (registry op 'attention...') in a model config's layer pattern."""
  from seqmix import registry  # pylint: disable=g-import-not-at-top
  if str(model_cfg.mixer).strip() == "none":  # the mixer-free control model
    return 0
  names = registry.expand_pattern(model_cfg.mixer, int(model_cfg.n_layers))
  return sum(registry.get(n).op.startswith("attention") for n in names)


def peak_flops(device: Any = None) -> float | None:
  """The device's dense bf16 peak FLOP/s, or None (CPU, unknown device)."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  kind = getattr(device, "device_kind", "")
  for key, peak in PEAK_BF16_FLOPS:
    if key.lower() in kind.lower():
      return peak
  return None


def mfu(flops_per_tok: float, tokens_per_sec: float, device: Any = None) -> float | None:
  peak = peak_flops(device)
  return None if peak is None else flops_per_tok * tokens_per_sec / peak


def fmt_mfu(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}%"


class Throughput:
  """Tokens per second between calls of `update` (wall clock; the caller synchronises)."""

  def __init__(self):
    self._t = time.perf_counter()

  def update(self, tokens: float) -> float:
    now = time.perf_counter()
    dt, self._t = now - self._t, now
    return tokens / dt if dt > 0 else float("nan")


class MetricWriter:
  """Scalars to TensorBoard event files under `logdir` (tensorboardX) and, optionally,
  one line per call to the console."""

  def __init__(self, logdir: str | None, *, console: bool = True):
    self._tb = None
    if logdir:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir)
    self._console = console

  def write(self, step: int, scalars: dict[str, Any], *, prefix: str = ""):
    clean = {}
    for k, v in scalars.items():
      if v is None:
        continue
      clean[f"{prefix}{k}"] = float(v)
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
    if self._console:
      body = "  ".join(f"{k} {v:.4g}" for k, v in clean.items())
      # tqdm.write keeps an active progress bar intact.
      tqdm.write(f"step {step}: {body}", file=sys.stdout)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None
