"""The launcher layer above the services: the ``specdec`` command and the local stack it runs.

``main`` (``specdec serve`` / ``specdec generate``), ``stack`` (Triton + draft service + orchestrator as
processes on 127.0.0.1, used by `specdec serve`, the end-to-end tests and the benchmark), ``generate`` (a
small GenerationService client). It starts the services from their own entry points and never imports
their internals.
"""
