"""Keep Python's full garbage collections off the request path of our long-running processes.

Why it exists: once a service has started, its process holds ~300,000 objects that the garbage collector
tracks (torch, transformers, the tokenizer, the model's modules), and all of them live as long as the
process. A full (generation-2) collection walks every one, a stall of a few hundred milliseconds on
whatever round is running (bench/README.md, "Design measurements"). ``gc.freeze()`` moves everything alive
after startup into the permanent generation, which collections skip; objects created while serving are
collected as before.

Called once per process by whoever owns it, when startup is done: ``python -m orchestrator``,
``python -m draft_service``, the Triton model's ``initialize`` (its stub process) and the benchmark, whose
own process times generations. Not from library code or tests: freezing is a decision of the process, not
of a module it imports.
"""

from __future__ import annotations

import gc
import logging


def freeze_startup_objects(log: logging.Logger) -> int:
    """Collect the garbage startup left, then exempt every surviving object from future collections."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("startup done: %d objects moved out of the garbage collector's reach (specdec.gc_freeze)", frozen)
    return frozen
