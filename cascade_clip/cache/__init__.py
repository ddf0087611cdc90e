"""HDF5 cache of the frozen encoder's tapped features (docs/design.md: Feature cache).

In `frozen` encoder mode the encoder never changes, so its tapped features are computed
once per training view and the decoders train from disk.

Decisions
---------
- **Rows are (image, view) pairs.** `cache.views_per_image` = V augmented views per
  training image; view `v` of image `i` (index in `splits/<split>.txt`) is drawn with
  `sample_rng(cfg.seed, v, i)`, the generator the online loader uses for epoch `v`, so the
  cached view `v` is exactly the view an online run with the same seed draws at epoch `v`.
  Views are sampled as the inductive loader samples them: the cat_max_ratio test sees the
  label with unseen classes mapped to 255, so no unseen-class information picks the crops.
- **Validation is not cached.** Evaluation resizes each image to its short side and runs
  overlapping sliding windows (crop 512, stride 426), so the number of windows varies per
  image; the trainer evaluates val online a few times per run, and caching every window
  of every val image would cost disk (2-3 windows x 7.3 MB per COCO image) for little
  speed-up. `cache-features --split val` therefore refuses with that reason.
- **Join by a small index, not HDF5 virtual datasets.** A virtual dataset whose source
  file is missing silently reads as fill values (zeros); the index lists the shard files
  with a per-shard random uid, so a missing or replaced shard is a clear error when the
  cache is opened. The index also holds the small per-row metadata (ids, views, class
  presence), so readers never scan the shards to build their item list.
- **Crash safety and resume.** A shard is written to `<out>.partial`; every dataset is
  allocated at creation (fixed size, early allocation, no fill), so writing a batch only
  writes raw data. After each batch the file is flushed, then the rows' `done` flags are
  set and flushed again, so after a kill the `done` flags are a prefix of written rows
  and a rerun resumes after it. The finished file is renamed onto `<out>` (atomic). An
  existing complete `<out>` is never modified: a rerun with the same config is a no-op, a
  different config is refused unless `overwrite=True` (then replaced only by the rename).
- **Verified when written, sampled when joined.** Before the rename the writer reads every
  row of the partial back and checks it (a CRC-32 per row taken before the write, and the
  values: `encoding.check_rows`); only then is the shard `complete` (`verified_rows`). A
  kill while verifying keeps the partial, and the rerun only verifies. The join checks
  what it joins (provenance, row counts, layout, each shard's verification) and the
  workflow's `cache-verify --sample` the values of a few rows, so no job re-reads the
  whole cache after its shards' jobs.
- **Precision.** The encoder runs in fp32; the taps are stored as `cache.encoding` says
  (fp16, or int8 scaled per token and renormalised on read: half the bytes;
  `cascade_clip.cache.encoding`), the global token fp16.

Shard file layout (M = rows = images in the shard x V; L taps, N = h*w tokens, C width)::

    /taps          (M, L, N, C) float16 or int8 (cache.encoding), chunks (1, L, N, C): one view per chunk
    /global_token  (M, C)       float16
    /checksum      (M,)         uint32   CRC-32 of the row's stored taps and global token
    /image_index   (M,)         int64    index of the image in the split list
    /view_index    (M,)         int16
    /ids           (M,)         S<n>     image id
    /view          (M,)         S512     JSON of cascade_clip.data.transforms.View
    /present       (M, K)       uint8    classes present in the image's full label
    /done          (M,)         uint8    1 once the row is written and flushed
    attrs: kind, format_version, code_version, model, weights_digest, tapped_blocks,
           tap_projection, tap_seed, input_size, mean, std, dataset, split, unseen,
           image_list_digest, num_images, seed, views_per_image, augment, grid,
           encoding, embed_dim, num_classes, shard_index, shard_count, image_start,
           image_stop, num_rows, shard_uid, complete, verified_rows, created

The joined index file holds the same provenance attributes plus `shard_files` (paths
relative to the index), `shard_uids`, `shard_rows`, and the concatenated `image_index`,
`view_index`, `ids`, `view`, `present` of all rows.

Modules
-------
- `provenance`: format constants, errors, digests, the provenance attributes and HDF5
  attribute helpers.
- `encoding`: how tokens are stored (fp16, int8), decoded, checksummed and checked.
- `write`: planning, writing and resuming one shard (`cache-features`).
- `index`: a cache's layout as readers see it, joining shards (`cache-join`) and verifying
  a cache (`cache-verify`).
- `read`: `FeatureCacheDataset`, the training items.
"""

from cascade_clip.cache.index import CacheLayout, join_shards, open_layout, verify_cache
from cascade_clip.cache.provenance import (
    CACHE_FORMAT_VERSION,
    GLOBAL_CHUNK_ROWS,
    INDEX_KIND,
    PARTIAL_SUFFIX,
    PROVENANCE_FIELDS,
    SHARD_KIND,
    VIEW_BYTES,
    CacheError,
    CacheMismatchError,
    check_provenance,
    file_sha256,
    image_list_digest,
    provenance,
    tapped_blocks,
    weights_digest,
)
from cascade_clip.cache.read import FeatureCacheDataset, to_tap_features
from cascade_clip.cache.write import (
    ShardPlan,
    build_model,
    parse_shard,
    partial_path,
    shard_range,
    write_shard,
)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "GLOBAL_CHUNK_ROWS",
    "INDEX_KIND",
    "PARTIAL_SUFFIX",
    "PROVENANCE_FIELDS",
    "SHARD_KIND",
    "VIEW_BYTES",
    "CacheError",
    "CacheLayout",
    "CacheMismatchError",
    "FeatureCacheDataset",
    "ShardPlan",
    "build_model",
    "check_provenance",
    "file_sha256",
    "image_list_digest",
    "join_shards",
    "open_layout",
    "parse_shard",
    "partial_path",
    "provenance",
    "shard_range",
    "tapped_blocks",
    "to_tap_features",
    "verify_cache",
    "weights_digest",
    "write_shard",
]
