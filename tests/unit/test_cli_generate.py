"""`specdec generate`'s flags become the GenerateRequest a user expects: unset fields stay unset (the
server's defaults: auto K, its default drafter, reproducible iff seeded), set ones are sent as given."""

from __future__ import annotations

from cli.generate import build_request, format_stats
from cli.main import build_parser
from specdec.v1 import generation_pb2


def request_for(*flags: str):
    return build_request(build_parser().parse_args(["generate", "hello", *flags]))


def test_unset_flags_leave_the_server_defaults() -> None:
    request = request_for()
    assert request.prompt == "hello" and request.drafter == ""
    for field in ("num_draft_tokens", "max_new_tokens", "reproducible"):
        assert not request.HasField(field), field
    assert not request.sampling.HasField("seed") and not request.sampling.HasField("temperature")


def test_set_flags_are_sent() -> None:
    request = request_for("--num-draft-tokens", "0", "--drafter", "ngram", "--seed", "7", "--no-reproducible",
                          "--temperature", "0.8", "--top-p", "0.9", "--stop", "\n\n")
    assert request.HasField("num_draft_tokens") and request.num_draft_tokens == 0
    assert request.drafter == "ngram" and request.sampling.seed == 7
    assert request.HasField("reproducible") and request.reproducible is False
    assert list(request.stop) == ["\n\n"] and abs(request.sampling.top_p - 0.9) < 1e-6
    assert request_for("--reproducible").reproducible is True


def test_the_statistics_line_shows_the_ks_and_what_the_target_decoded_on_its_own() -> None:
    stats = generation_pb2.GenerationStats(
        rounds=5, emitted_tokens=30, auto_num_draft_tokens=True, rounds_by_k=[4, 0, 1], speculation_off_rounds=4,
        decoded_rounds=4, decoded_tokens=28, drafted_tokens=2, accepted_tokens=1, total_time_ms=600.0,
    )
    line = format_stats(stats, generation_pb2.FINISH_REASON_LENGTH)
    assert "tokens: 30 in 5 rounds (K=auto (rounds by K: 0:4 2:1; 4 off, 0 probes))" in line
    assert line.endswith("decoded by the target on its own: 28 tokens in 4 rounds") and "20.0 ms/token" in line
