"""The draft service's drafters, one module each, behind one interface (`base.Drafter`).

``model`` drafts with a small causal LM (its steps batched across streams by `steps.StepLoop`); ``ngram``
is prompt lookup over the sequence's own context; ``suffix`` is a suffix index over the sequence and a
bounded cache of recent outputs; ``hybrid`` asks a model-free drafter first and the model when it has
nothing. A deployment offers some of them (``--drafters``, the first is the default); one that offers no
model-based drafter loads no model and needs no GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

DRAFTERS = ("model", "ngram", "suffix", "hybrid")
MODEL_BASED = frozenset({"model", "hybrid"})
LOOKUPS = ("ngram", "suffix")  # the model-free drafters a hybrid may ask first


def parse_drafters(text: str) -> tuple[str, ...]:
    """``"suffix,model"`` -> ("suffix", "model"); ValueError for an unknown, repeated or missing name."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in DRAFTERS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"drafters must be distinct names among {list(DRAFTERS)}, got {text!r}")
    return names


def needs_model(names: Sequence[str]) -> bool:
    return any(name in MODEL_BASED for name in names)
