"""`specdec generate`'s flags become the GenerateRequest a user expects: unset fields stay unset (the
server's defaults: auto K, its default drafter, reproducible iff seeded), set ones are sent as given."""

from __future__ import annotations

from cli.generate import build_request
from cli.main import build_parser


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
