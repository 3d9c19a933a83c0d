"""The specdec benchmark: our stack vs target-only vs Hugging Face, per workload, single stream and under load.

The top floor of the house: it starts the whole stack (``cli.stack``) and times it from a client. One
module per purpose: ``config`` (flags), ``workloads`` (the prompts), ``arms`` (what is compared, and a
generation's record), ``client`` (our public API and the servers' counters), ``peer`` (HF generate
in-process), ``systems`` (either, behind one call), ``single`` (single-stream phases), ``load``
(concurrency and cancellations), ``theory`` (α and Leviathan's ideal), ``stats`` (intervals), ``summary``
(tables and goals), ``report`` (Markdown, CSV, figures), ``sweep`` (choosing the self-draft) and
``runner`` (the sequence of a run). Run it with ``python -m bench`` (bench/README.md).
"""
