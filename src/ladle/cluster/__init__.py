"""Ladle on a Ray cluster (`ladle serve --ray`): every model a Ray Serve deployment whose replicas each run a model
host, behind ladle's own HTTP front end. This package is the only code that imports `ray` (the `ray` extra); the
modules without a ray import (hints, prefix_index, metrics_merge, forwarding, plans) are plain Python.
"""
