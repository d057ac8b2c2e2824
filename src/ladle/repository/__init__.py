"""The versioned model repository: layout on disk, per-model config, and the live registry."""
