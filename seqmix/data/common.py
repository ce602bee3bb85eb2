"""Pieces every pipeline shares: the ignore label, per-process batch rows, grain read options."""

from __future__ import annotations

import grain

IGNORE = -100  # targets not scored (the loss and metrics skip them)


def process_rows(batch_size: int, process_index: int | None,
                 process_count: int | None) -> tuple[int, int, int]:
  """(process_index, process_count, rows per process), with jax's values as defaults.

  `batch_size` is the global batch; it must split evenly over the processes.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # only when the caller did not say
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count}).")
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} (global) must be divisible by process_count={process_count}; "
        "set the batch size to a multiple of the number of hosts.")
  return process_index, process_count, batch_size // process_count


def default_read_options() -> grain.ReadOptions:
  # Rows are cheap slices: two threads and a short buffer keep shared CPUs free (grain's default
  # of 16 threads and 500 prefetched elements would compute hundreds of batches ahead).
  return grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
