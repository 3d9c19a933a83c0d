"""The specdec benchmark: ArS vs SpS through our gRPC stack vs Hugging Face, with the ideal beside them.

The top floor of the house: it starts the whole stack (``cli.stack``) and times it from a client. One
module per purpose: ``config`` (flags), ``stack_runs`` (timing the real stack over gRPC), ``peer`` (HF
generate in-process), ``theory`` (α, c, v(K), Leviathan's ideal), ``schedule`` (interleaving the timed
systems), ``summary`` (the table's numbers), ``report`` (Markdown, CSV, figure), ``sweep`` (choosing the
self-draft) and ``runner`` (the sequence of a run). Run it with ``python -m bench`` (bench/README.md).
"""
