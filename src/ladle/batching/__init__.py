"""Dynamic batching: bounded priority queues, batch assembly, and model instances."""
