"""The target model of speculative sampling, served by the real NVIDIA Triton Inference Server.

``model_repository/specdec_target`` is a Triton python-backend model: a causal LM with one rollback-able KV
cache per Triton sequence id. ``triton_model`` holds its logic (unit-tested without Triton), ``config`` its
settings (the model's parameters and the server's flags, declared once), ``launcher`` starts the
``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel on this model repository
(``python -m target_service``). The tensor contract clients code against is ``specdec.target_contract``.
"""
