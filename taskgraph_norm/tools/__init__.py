"""The command line and what it runs: ``cli`` (``taskgraph-norm``), ``report`` (the
main job; ``report_timing``: how its rows are timed), ``report_files`` (its Markdown page
and pictures) and ``bench``."""
