"""The `specdec` command: `serve` the whole stack on embedded defaults, `generate` against a running one.

`specdec serve` starts Triton (SmolLM2-135M target), the draft service (a SmolLM2 self-draft) and the
orchestrator on 127.0.0.1, shows progress while the models load, prints the address, and stops all three
on Ctrl-C, SIGTERM or a closed terminal's SIGHUP (while they start, too);
``--draft-replicas N --target-replicas M`` starts a local fleet of N drafts and M Tritons behind the one
orchestrator. `specdec generate "PROMPT"` calls a running orchestrator and prints the text and the stats.
The services also run on their own (`python -m target_service | draft_service | orchestrator`), which is
how a fleet deploys them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence

from specdec import config as config_flags
from specdec.startup import StopSignals

log = logging.getLogger("specdec")


def build_parser() -> argparse.ArgumentParser:
    """`specdec serve` (StackConfig's flags) and `specdec generate`."""
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from cli.stack import StackConfig

    serve = sub.add_parser("serve", help="run Triton + draft + orchestrator locally until Ctrl-C")
    config_flags.build_parser(StackConfig, parser=serve, env_prefix="SPECDEC_SERVE_")

    generate = sub.add_parser("generate", help="generate text with a running orchestrator")
    generate.add_argument("prompt")
    generate.add_argument("--address", default="127.0.0.1:50051", help="the orchestrator's host:port")
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--num-draft-tokens", type=int, help="a fixed K; 0 = target-only; unset = the server's default (auto)")
    generate.add_argument("--drafter", default="", help="a drafter the deployment offers (model, ngram, suffix, hybrid)")
    generate.add_argument(
        "--reproducible", action=argparse.BooleanOptionalAction, default=None,
        help="the seed reproduces the text whatever K and drafter (the coupled mode); unset = on when --seed is given",
    )
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--stream", action="store_true", help="print tokens as each round produces them")
    generate.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cli.stack import StackConfig

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        fields = {f.name for f in dataclasses.fields(StackConfig)}
        try:
            config = StackConfig(**{k: v for k, v in vars(args).items() if k in fields})
        except ValueError as exc:
            parser.error(str(exc))  # a usage error, as argparse's own: the message, exit 2
        return serve_command(config)
    if args.command == "generate":
        from cli.generate import generate_command

        return generate_command(args)
    raise AssertionError(f"unhandled command {args.command!r}")


def serve_command(config: "StackConfig") -> int:  # noqa: F821 - imported lazily (torch is slow to import)
    from cli.stack import LocalStack

    # SIGHUP too: a closed terminal would otherwise end us before we stop the services.
    signals = StopSignals(log, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    with LocalStack(config) as stack:
        signals.serving()
        sys.stdout.write(
            f"specdec is serving specdec.v1.GenerationService on {stack.address}\n"
            f"  try: specdec generate --address {stack.address} \"The capital of France is\"\n"
            f"  draft replicas: {', '.join(stack.draft_addresses) or 'none'}; Triton replicas: "
            f"{', '.join(stack.triton_urls)}\n"
            f"  metrics: {stack.orchestrator_metrics_url} (orchestrator), "
            f"{', '.join(stack.draft_metrics_urls) or '-'} (draft), {', '.join(stack.triton_metrics_urls)} (Triton)\n"
            "  Ctrl-C stops every service.\n"
        )
        sys.stdout.flush()
        while not signals.stop.wait(1.0):
            try:
                stack.check_alive()
            except RuntimeError as exc:
                log.error("%s", exc)
                return 1
        log.info("stopping the orchestrator, the draft service(s) and Triton(s) ...")
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
