"""fer_ray: train, sweep and ensemble FER-2013 models on Ray.

Layers, bottom up: ``fer_ray.data`` (ingest, splits, augmentation, the prepared dataset), ``fer_ray.models``
(registry), ``fer_ray.engine`` / ``fer_ray.loop`` (pure-torch loops, the training run), ``fer_ray.cluster`` (the Ray
session), ``fer_ray.train`` (Ray Train), ``fer_ray.schedulers`` / ``fer_ray.sweep`` (Ray Tune + successive halving),
``fer_ray.tta`` / ``fer_ray.ensemble`` / ``fer_ray.report`` (logit store, combiners, leaderboard).
"""

import time as _time

__version__ = "0.1.0"
IMPORTED_AT = _time.time()
"""When this process began importing fer_ray: the import phase of a Ray Train worker's start-up profile."""
