"""straggler: find the slow accelerator before it slows every synchronous job it joins.

Importing this package does nothing: no NVML, no torch, no threads, no sockets.
"""

__version__ = "0.1.0"
