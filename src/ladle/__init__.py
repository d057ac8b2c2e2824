"""ladle: a model server."""
