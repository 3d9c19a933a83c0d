"""The whole stack on an IPv6 loopback (``specdec serve --host ::1``): every service binds there, and every
address and URL between them is written so that gRPC and HTTP clients can parse it.

Why: an operator may bind the services to an IPv6 address (a dual-stack or IPv6-only pod). A host joined
to its port with a bare colon (``::1:8001``) is unreadable to gRPC, and Triton itself needs it in two other
forms (`target_service.launcher.triton_bind_addresses`): given ``::1`` as is, its HTTP server bound
255.255.255.255 without a word. Before, ``specdec serve --host ::1`` stopped at its first free-port pick.
"""

from __future__ import annotations

import grpc
import pytest

from cli.stack import LocalStack
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tests.integration.live import draft_live_sequences, tiny_stack_config, triton_live_sequences, wait_until
from tests.integration.loadgen import metric, scrape

pytestmark = pytest.mark.integration


def test_a_stack_on_ipv6_loopback_drafts_verifies_and_reports(tiny_model, tmp_path) -> None:
    config = tiny_stack_config(tiny_model, tmp_path / "logs", host="::1", drafters="model")
    with LocalStack(config) as stack:
        urls = [stack.address, *stack.draft_addresses, *stack.triton_urls, stack.orchestrator_metrics_url,
                *stack.draft_metrics_urls, *stack.triton_metrics_urls]
        assert all(url.removeprefix("http://").startswith("[::1]:") for url in urls), urls
        request = generation_pb2.GenerateRequest(prompt="Is anyone there?", max_new_tokens=8, num_draft_tokens=2)
        with grpc.insecure_channel(stack.address) as channel:
            response = generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=120)
        assert len(response.token_ids) == 8 and response.stats.drafted_tokens > 0, response.stats
        (draft,), (triton,) = stack.draft_addresses, stack.triton_metrics_urls
        wait_until(lambda: draft_live_sequences(draft) == 0 and triton_live_sequences(triton) == 0,
                   "both replicas released the generation")  # fmt: skip
        served = metric(scrape(stack.orchestrator_metrics_url), "specdec_orchestrator_requests_total",
                        {"code": "OK"})  # fmt: skip
        assert served == 1
        log_text = stack.process("triton").log_path.read_text()
        assert "liveness probes every" in log_text  # its own probes reached the model over ::1
