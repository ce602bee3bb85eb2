"""Test session set-up (DESIGN.md, Distribution) and shared fixtures.

On the CPU (the default, and CI): 8 simulated host devices. `make test-gpu` sets
`JAX_PLATFORMS=cuda`, which overrides the default here; the host-device flag then only
shapes the unused host platform (harmless), and float32 matmuls are pinned to full precision
(see below).
"""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] != "cpu":
  # The op tests check each fast form against the float32 reference at rtol 1e-5. On the GPU
  # XLA runs float32 matmuls in TF32 by default (~1e-3 relative), in the form under test and
  # in the reference alike, which would hide the algorithm under rounding noise. The tests
  # check the algorithms at full precision; experiments/bench/device_check.py checks the
  # default precision. Set JAX_DEFAULT_MATMUL_PRECISION yourself to override.
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def _in_ci() -> bool:
  """True when the `CI` environment variable is set (GitHub Actions etc. set CI=true)."""
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def tinyshakespeare_path():
  """Path of the verified tinyshakespeare corpus, found as the library finds it.

  `seqmix.data.corpora.corpus_path` looks in `$SEQMIX_DATA_DIR`, then the user cache (no
  download here). Missing: the test fails when `CI` is set (CI must provide the corpus, so a
  lost copy cannot silently turn the tests into skips) and is skipped otherwise.
  """
  from seqmix.data import corpora  # here, not at the top: seqmix.data needs grain

  try:
    return corpora.corpus_path("tinyshakespeare", download=False)
  except corpora.CorpusNotFoundError as e:
    msg = (f"tinyshakespeare not found: set {corpora.DATA_DIR_ENV} to the directory holding "
           f"tinyshakespeare.txt ({e})")
  if _in_ci():  # outside the except: the report shows this message, not a chained traceback
    pytest.fail(f"CI is set and {msg}", pytrace=False)
  pytest.skip(msg)
