"""The end-to-end fixture: the real stack (Triton + draft + orchestrator) on 127.0.0.1 and free ports.

Started once per test session by the tests that ask for it and stopped after them. If Triton, the model or
any service cannot start, the fixture fails (never skips) with the tail of that service's log.
"""

from __future__ import annotations

import pytest

from specdec.stack import LocalStack, StackConfig


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    config = StackConfig(port=0, log_dir=str(tmp_path_factory.mktemp("stack-logs")))
    with LocalStack(config) as running:
        yield running
