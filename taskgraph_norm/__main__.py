"""``python -m taskgraph_norm`` is the ``taskgraph-norm`` command."""

import sys

from .tools.cli import main

sys.exit(main())
