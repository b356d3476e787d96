"""The operator process: `kopf run -m modeldeploy_operator.main`.

This module is the process edge: it reads the configuration once, from the environment, and
registers the handlers in kopf's default registry (kopf imports it before starting).
"""

from __future__ import annotations

import gc
import os

import kopf

from modeldeploy_operator import batch_handlers
from modeldeploy_operator.config import OperatorConfig
from modeldeploy_operator.handlers import register

# The index holds every child as parsed JSON, a tree of dicts and lists that the cycle collector
# scanned over and over: at the default thresholds (700, 10, 10) collections took 38 s, about a
# quarter of the operator's CPU, in a run of 3,000 ModelDeployments (4 s at these). JSON has no
# cycles; ours (asyncio, exceptions) can wait for a young generation of 50,000 objects. What
# imports allocated is never garbage: frozen.
gc.freeze()
gc.set_threshold(50_000, 20, 10)

CONFIG = OperatorConfig.from_env(os.environ)
register(kopf.get_default_registry(), CONFIG)
batch_handlers.register(kopf.get_default_registry(), CONFIG)
