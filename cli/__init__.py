"""The launcher layer above the services: the ``specdec`` command and the local stack it runs.

``main`` (``specdec serve`` / ``specdec generate``), ``stack`` (Triton + draft service + orchestrator as
processes on 127.0.0.1, used by `specdec serve`, the end-to-end tests and the benchmark), ``generate`` (a
small GenerationService client). It starts the services from their own entry points (``python -m ...``),
as a fleet would, and uses only what they export for that (their drafter names, the target's contract).
"""
