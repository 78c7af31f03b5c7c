"""Pipeline parallelism: schedules as data (``schedules``), and the runtime that executes them."""

from .schedules import *  # noqa: F401,F403
from .schedules import __all__  # noqa: F401
