"""Shared pieces of the checkpoint converters: local safetensors I/O, the checked tensor reader,
the seqmix checkpoint format, and the family table.

Reading is from local files only: `load_state_dict(dir)` opens `model.safetensors` or the shards
that `model.safetensors.index.json` lists. Downloading is the hub client's job, never this
package's.

Every family module (gpt2, llama, mamba, mamba2) provides

    config_from_hf(hf: dict) -> ml_collections.ConfigDict     # LanguageModel fields
    params_from_hf(reader: TensorReader, cfg) -> params          # nested dict of np arrays
    config_to_hf(cfg) -> dict                                    # the HF config.json
    params_to_hf(params, cfg) -> dict[str, np.ndarray]           # the HF state dict

`params_from_hf` takes every tensor through `reader.take(name, expected_shape)`, which raises
`TensorMismatch` naming the first tensor that does not fit (name, expected shape, found shape);
`reader.finish()` then rejects tensors the mapping never used (a checkpoint of a variant the
mapping does not know), so nothing is dropped silently.
"""

import json
import os
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

SEQMIX_CONFIG = "seqmix_config.json"
SEQMIX_PARAMS = "seqmix_params.safetensors"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


class TensorMismatch(ValueError):
  """A checkpoint tensor is missing or has the wrong shape for the configured model."""


def _require_safetensors():
  try:
    import safetensors  # noqa: F401
  except ImportError as e:  # pragma: no cover - the [interop] extra installs it
    raise ImportError("seqmix.convert reads and writes safetensors files: "
                      "pip install 'seqmix[interop]' (or safetensors).") from e


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def write_json(obj: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write("\n")


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, tuple):
    return list(x)
  return str(x)


def _safetensors_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  index = os.path.join(path, HF_INDEX)
  if os.path.exists(index):
    shards = sorted(set(read_json(index)["weight_map"].values()))
    return [os.path.join(path, s) for s in shards]
  single = os.path.join(path, HF_WEIGHTS)
  if os.path.exists(single):
    return [single]
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not found:
    raise FileNotFoundError(
        f"no safetensors weights in {path!r} (looked for {HF_WEIGHTS}, {HF_INDEX} and "
        f"*.safetensors). seqmix.convert reads local files only; download the checkpoint with "
        f"your hub client first (e.g. `huggingface-cli download <repo> --local-dir {path}`), "
        f"or re-save a .bin checkpoint with save_pretrained(safe_serialization=True).")
  return [os.path.join(path, f) for f in found]


def load_state_dict(path: str, *, progress: bool = True) -> dict[str, np.ndarray]:
  """All tensors of a local safetensors checkpoint (a directory or one file) as NumPy arrays.

  bfloat16 tensors come back as ml_dtypes' bfloat16 NumPy arrays (no torch needed).
  """
  _require_safetensors()
  from safetensors import safe_open
  files = _safetensors_files(path)
  names = []
  for f in files:
    with safe_open(f, framework="flax") as h:
      names += [(f, k) for k in h.keys()]
  out = {}
  handles = {}
  try:
    for f, k in tqdm(names, desc="read tensors", unit="tensor", disable=not progress,
                     leave=False):
      if f not in handles:
        handles[f] = safe_open(f, framework="flax").__enter__()
      out[k] = np.asarray(handles[f].get_tensor(k))
  finally:
    for h in handles.values():
      h.__exit__(None, None, None)
  return out


def save_state_dict(tensors: dict[str, np.ndarray], path: str, *, metadata=None) -> None:
  """Write tensors to one safetensors file (contiguous copies; bfloat16 kept)."""
  _require_safetensors()
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
            metadata=metadata or {"format": "pt"})


class TensorReader:
  """Hands out checkpoint tensors by name after checking their shapes.

  take(name, shape) -> the array; raises TensorMismatch if the tensor is absent or its shape is
  not `shape`. finish() raises if tensors remain that no rule took (except `ignore`d ones).
  """

  def __init__(self, tensors: dict[str, np.ndarray], *, ignore: Iterable[str] = (),
               progress: bool = True, source: str = "checkpoint"):
    self._tensors = tensors
    self._left = set(tensors)
    self._ignore = tuple(ignore)
    self._source = source
    self._bar = tqdm(total=len(tensors), desc="convert tensors", unit="tensor",
                     disable=not progress, leave=False)

  def has(self, name: str) -> bool:
    return name in self._tensors

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    if name not in self._tensors:
      close = sorted(self._left)[:5]
      raise TensorMismatch(f"tensor {name!r} is missing from the {self._source}; expected shape "
                           f"{shape}. Tensors not used yet include: {close}.")
    x = self._tensors[name]
    if tuple(x.shape) != shape:
      raise TensorMismatch(f"tensor {name!r}: expected shape {shape}, found shape "
                           f"{tuple(x.shape)}. The config does not describe this checkpoint "
                           f"(check the config.json beside the weights).")
    if name in self._left:
      self._left.discard(name)
      self._bar.update(1)
    return x

  def finish(self) -> None:
    self._bar.close()
    left = sorted(n for n in self._left if not any(n.endswith(s) for s in self._ignore))
    if left:
      raise TensorMismatch(f"{len(left)} tensor(s) of the {self._source} have no place in the "
                           f"seqmix model (a variant this mapping does not convert): "
                           f"{left[:8]}{' ...' if len(left) > 8 else ''}.")


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dict -> {"a/b/c": leaf} (the seqmix params file layout)."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if hasattr(v, "items"):
      out.update(flatten(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for key, v in flat.items():
    node = out
    *path, leaf = key.split("/")
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def unbox(params):
  """Plain nested dicts of NumPy arrays from (possibly boxed, frozen) Flax params."""
  import flax.linen as nn
  params = nn.unbox(params)
  return unflatten(flatten(params))


def check_choice(field: str, value, choices, what: str) -> None:
  if value not in choices:
    raise NotImplementedError(f"{what}: {field}={value!r} is not converted; supported: "
                              f"{list(choices)}.")


def t(x) -> np.ndarray:
  """The transpose of a 2-D array (torch Linear [out, in] <-> Flax Dense kernel [in, out])."""
  return np.ascontiguousarray(np.asarray(x).T)


def torch_conv_to_taps(w) -> np.ndarray:
  """torch depthwise Conv1d weight [D, 1, L] (w[..., -1] is the current token) -> seqmix
  `causal_conv` kernel [L, D] (k[0] is the current token)."""
  w = np.asarray(w)
  return np.ascontiguousarray(w[:, 0, ::-1].T)


def taps_to_torch_conv(k) -> np.ndarray:
  k = np.asarray(k)
  return np.ascontiguousarray(k.T[:, None, ::-1])

