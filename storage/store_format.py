"""The feature store's format name and version (a module of its own: naming a store needs them, not numpy or Zarr)."""

FORMAT = "uld-feature-store"
#: Part of every store's config hash: bump it when the layout changes so old stores are never reused.
FORMAT_VERSION = 1
