"""pressroom.presses: kvpress ``BasePress`` subclasses and the ``Cache`` classes they need.

``PRESSES`` maps the registry names used by ``pressroom-eval`` to press classes; every press listed here
takes ``compression_ratio`` and works in kvpress's pipeline.
"""

from pressroom.presses.anchor_press import AnchorPress
from pressroom.presses.commvq_ablation_press import CommVQAblationPress
from pressroom.presses.commvq_cache import CommVQCache, CommVQLayer
from pressroom.presses.commvq_press import CommVQPress
from pressroom.presses.memory import cache_memory_bytes
from pressroom.presses.ordered_streaming_llm_press import OrderedStreamingLLMPress
from pressroom.presses.sink_window_cache import SinkWindowCache, SinkWindowLayer
from pressroom.presses.sink_window_press import SinkWindowPress

PRESSES: dict[str, type] = {"sink_window": SinkWindowPress, "anchor": AnchorPress, "commvq": CommVQPress}

__all__ = [
    "PRESSES",
    "AnchorPress",
    "CommVQAblationPress",
    "CommVQCache",
    "CommVQLayer",
    "CommVQPress",
    "OrderedStreamingLLMPress",
    "SinkWindowCache",
    "SinkWindowLayer",
    "SinkWindowPress",
    "cache_memory_bytes",
]
