"""Data pipelines (grain): text corpora, tokenizers, tensorstore token stores, packing, MQAR.

Entry point: `seqmix.data.pipeline.make_datasets(cfg.data, seq_len=, batch_size=, seed=)`
(re-exported here). Modules: `tokenizers` (byte, char), `corpora` (tinyshakespeare lookup,
verified download, nanoGPT split), `text` (random training windows, whole-split validation),
`token_store` (zarr token arrays + metadata), `packing` (documents -> rows with segment ids),
`mqar` (zoology's multi-query associative recall, its Based-paper mixed variant and its
accuracy), `synthetic` (selective copying, induction heads, passkey retrieval), `tasks` (every
synthetic task behind one interface, for `experiments/sweep.py`).
"""

from seqmix.data.pipeline import Datasets, make_datasets  # noqa: F401
