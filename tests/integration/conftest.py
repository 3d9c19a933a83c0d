"""The end-to-end fixture: the real stack (Triton + draft + orchestrator) on 127.0.0.1 and free ports.

Started once per test session by the tests that ask for it and stopped after them. If Triton, the model or
any service cannot start, the fixture fails (never skips) with the tail of that service's log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.stack import LocalStack, StackConfig
from specdec.tiny import save_tiny_llama_with_tokenizer

# These tests check speculation itself (greedy equality, statistics): no per-round draft time limit, so a
# machine busy with other work never turns their rounds target-only (fallbacks are tests/integration/test_load.py's).
STACK_ENV = {"SPECDEC_ORCHESTRATOR_DRAFT_ROUND_TIMEOUT_S": "0"}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    config = StackConfig(port=0, log_dir=str(tmp_path_factory.mktemp("stack-logs")))
    with LocalStack(config, env=STACK_ENV) as running:
        yield running


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny text model (random weights, byte-level tokenizer) the load, fleet and fault stacks serve."""
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny-model") / "model")
