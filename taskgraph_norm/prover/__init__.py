"""The prover: reads a graph's merge DAG and certifies determinism and batch
invariance, or refutes them.

``canonical`` reads the graph into its canonical expression; ``rules`` applies the
structure and exactness rules and builds the :class:`Proof` (``proof``); ``witness`` searches
for and replays a concrete counterexample, and runs only when a refuted proof is
asked for its witness (``proof.witness``), never on the path of a call.
The prover imports only the IR (and, for a witness replay, the reference
executor); executors never import the prover: they are handed a proof.
"""

from __future__ import annotations

from .rules import FINGERPRINT_VERSION as FINGERPRINT_VERSION
from .rules import RULES as RULES
from .proof import Proof as Proof
from .rules import prove as prove
from .witness import Witness as Witness

__all__ = ["FINGERPRINT_VERSION", "RULES", "Proof", "Witness", "prove"]
