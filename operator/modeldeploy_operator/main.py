"""The operator process: `kopf run -m modeldeploy_operator.main`.

This module is the process edge: it reads the configuration once, from the environment, and
registers the handlers in kopf's default registry (kopf imports it before starting).
"""

from __future__ import annotations

import os

import kopf

from modeldeploy_operator import batch_handlers
from modeldeploy_operator.config import OperatorConfig
from modeldeploy_operator.handlers import register

CONFIG = OperatorConfig.from_env(os.environ)
register(kopf.get_default_registry(), CONFIG)
batch_handlers.register(kopf.get_default_registry(), CONFIG)
