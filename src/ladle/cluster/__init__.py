"""Ladle on a Ray cluster (`ladle serve --ray`): every model a Ray Serve deployment whose replicas each run a model
host, behind ladle's own HTTP front end. This package is the only code that imports `ray` (the `ray` extra); the
modules without a ray import (hints, prefix_index, metrics_merge, forwarding, plans, models) are plain Python.

Importing the package sets ladle's Ray Serve settings (plans.SERVE_ENV) in this process's environment, unless set
already: Ray Serve reads them once, when `ray.serve` is first imported, which every module here that needs Ray does
after this runs.
"""

import os

from ladle.cluster.plans import SERVE_ENV

for _key, _value in SERVE_ENV.items():
    os.environ.setdefault(_key, _value)
