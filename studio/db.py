"""The database layer (defined in workers.db so workers need no web stack)."""

from workers.db import *  # noqa: F401,F403
from workers.db import Adapter, Metric, Run, Upload, WorkerRow, transaction, upgrade  # noqa: F401
