"""How many tokens of each waiting request one forward runs, when a forward may run at most ``budget`` tokens.

Why it exists: a forward costs what its tokens cost, and every sequence in it waits for all of them. A
2,048-token prompt run in one forward held the sequences decoding beside it for 3 s on this project's CPU;
in forwards of 256 tokens, for 0.37 s at a time, and the prompt itself was done sooner (bench/README.md,
"Design measurements"). So the Triton target (`target_service.steps.fit`) and the draft service's model
drafter (`draft_service.drafters.steps`) prefill long prompts in chunks beside the rows in flight, as
vLLM's chunked prefill does, with this one rule.

The rule: a request that is all rows (a decode's token, a verification's K + 1, whose logits it needs)
always runs whole; prompts share what is left, first come first, and the first of them gets at least a
quarter of the budget whatever the rows took, so prompts always advance. A prompt that does not fit runs
its first part (a chunk, which never reaches the positions whose rows it returns) or waits.
"""

from __future__ import annotations

from collections.abc import Sequence


def share(sizes: Sequence[tuple[int, int]], budget: int) -> list[int | None]:
    """Per request, given as (tokens, rows) in arrival order: the tokens it runs in this forward (all, or the
    first part of a prompt), or None when it waits for a later one. ``budget`` 0 = no limit (all run)."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0 (0 = no limit), got {budget}")
    runs: list[int | None] = [None] * len(sizes)
    used = 0
    for index, (tokens, rows) in enumerate(sizes):  # rows first: they never wait for a prompt
        if not budget or tokens <= rows:
            runs[index] = tokens
            used += tokens
    first = True
    for index, (tokens, rows) in enumerate(sizes):
        if runs[index] is not None:
            continue
        room = budget - used
        if first:  # the oldest prompt advances however many rows there are
            room, first = max(room, budget // 4, 1), False
        take = tokens if tokens <= room else min(room, tokens - rows)
        if take > 0:
            runs[index] = take
            used += take
    return runs
