"""What a verdict rests on: the names of the ``basis`` column (``res.devices``, the JSON document,
the collector's ``/api/v1/gpus``). Defined here once; the engine and the tests use these names, and
docs/analysis.md and docs/interfaces.md are checked against ``ALL``. Importing it loads nothing.

A device's basis is the test that flags it (several joined by ``JOIN`` when more than one does), or
for a device not flagged the first test that applies to it, or ``NONE``.
"""

from __future__ import annotations

FLEET = "fleet_peers"  # a peer group whose devices sit on several hosts
HOST = "host_peers"  # a peer group whose devices all sit on one host (a scan of one node)
LOO = "_loo"  # suffix of FLEET / HOST: a group of 2-3 devices, decided leave-one-out
NODE_MATES = "node_mates"  # inside a FLEET group: slower than the median of its node-mates
HISTORY = "history"  # slower than its own past scans
REFERENCE = "reference"  # slower than a configured reference value (a device without peers)
NONE = "none"  # nothing to compare with
JOIN = "+"

ALL = (FLEET, HOST, FLEET + LOO, HOST + LOO, NODE_MATES, HISTORY, REFERENCE, NONE)
