"""The concurrent executor: anyio tasks on worker lanes (``devices``), per-device
streams, schedules that pick the next ready node, and traces of a run.

Nothing is imported here: :mod:`taskgraph_norm.executors` re-exports
:func:`~.executor.run_concurrent`.
"""
