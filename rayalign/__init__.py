"""rayalign: iterative LLM preference alignment on Ray.

Importing the package is cheap and side-effect free: it never imports ray, vllm or deepspeed.
Those are imported only by the stage modules that need them.
"""

__version__ = "0.1.0"
