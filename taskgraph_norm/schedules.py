"""Schedule policies for the concurrent executor (``tgn.schedules.Random(seed)``...).

A public facade over :mod:`taskgraph_norm.execute.schedules`; see there for the
decision model and how to write a policy of your own.
"""

from __future__ import annotations

from .execute.schedules import ANY as ANY
from .execute.schedules import COMPLETE as COMPLETE
from .execute.schedules import DISPATCH as DISPATCH
from .execute.schedules import PCT as PCT
from .execute.schedules import Fifo as Fifo
from .execute.schedules import Random as Random
from .execute.schedules import Replay as Replay
from .execute.schedules import Schedule as Schedule
from .execute.schedules import Scheduler as Scheduler

__all__ = ["ANY", "COMPLETE", "DISPATCH", "PCT", "Fifo", "Random", "Replay", "Schedule", "Scheduler"]
