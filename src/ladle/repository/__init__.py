"""The versioned model repository, pure data: layout on disk, per-model config, signatures (the host: serving/)."""
