"""`specdec bench`: ArS vs SpS through our gRPC stack vs Hugging Face assisted generation, with the ideal.

One module per purpose: ``config`` (flags), ``stack_runs`` (timing the real stack over gRPC), ``peer``
(HF generate in-process), ``theory`` (α, c, v(K), Leviathan's ideal), ``summary`` (the table's numbers),
``report`` (Markdown, CSV, figure), ``sweep`` (choosing the self-draft), ``tiny`` (the quick mode's model)
and ``runner`` (the sequence of a run).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with command-line flags (see `specdec bench --help`); returns the exit code."""
    from specdec.bench.runner import main as run

    return run(argv)
