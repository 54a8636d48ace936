"""pressroom.presses: kvpress ``BasePress`` subclasses and the ``Cache`` classes they need.

``PRESSES`` maps the registry names used by ``pressroom-eval`` to press classes; every press listed here
takes ``compression_ratio`` and works in kvpress's pipeline.
"""

from pressroom.presses.memory import cache_memory_bytes

PRESSES: dict[str, type] = {}

__all__ = ["PRESSES", "cache_memory_bytes"]
