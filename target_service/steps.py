"""The target's contract applied to the batched engine: every request Triton hands over in one forward.

Why it exists: Triton's sequence batcher gives ``execute()`` up to ``max_batch_size`` requests from
different sequences. `run_batch` answers all of them with **one** engine step (docs/architecture.md,
"Batching"): each request rolls its sequence's KV cache back, appends its tokens and gets the rows of its
last positions, warped and packed when it carries sampling settings. A *decode* request (DECODE_STEPS)
samples its token from its row with the orchestrator's own rule (`specdec.round_draws`) and, until it has
its tokens, comes back as its own continuation for the next forward; with LOOKUP, each of its forwards also
verifies the draft `specdec.lookup` finds in the sequence's own tokens, with the same rule. One bad
request never fails its neighbours: refusals come back per request as a `StepError`, and it never raises. Pure of Triton
(``target_service.triton_model`` is the adapter), so unit tests drive it with a tiny model.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from specdec import target_contract as contract
from specdec.engine import CausalLMEngine, StepItem
from specdec.forward_budget import share
from specdec.kv_cache import KVCache
from specdec.lookup import ROW_COST, propose
from specdec.prefix_cache import Hit, PrefixCache
from specdec.round_draws import draw_round
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams, warp_packed
from specdec.sequences import CapacityError, Entry, SequenceNotFoundError, SequenceStore

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
Read = Callable[[str], "np.ndarray | None"]


class ErrorCode(enum.Enum):
    """What went wrong with one request; the adapter maps these to ``pb_utils.TritonError`` codes."""

    INVALID_ARG = "INVALID_ARG"  # the request is malformed or inconsistent with the cache
    NOT_FOUND = "NOT_FOUND"  # the sequence holds no cache here: re-send the prefix with START
    UNAVAILABLE = "UNAVAILABLE"  # capacity: too many live sequences, back off or go elsewhere
    INTERNAL = "INTERNAL"  # a bug or a failed forward; the traceback is in the Triton log only
    CANCELLED = "CANCELLED"  # its sequence was released before it ran: its caller has gone


@dataclass(frozen=True)
class StepError:
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class StepRequest:
    """One Triton request, decoded from its tensors at the edge (`read_request`)."""

    sequence_id: int  # the Triton correlation id (uint64)
    token_ids: tuple[int, ...]  # tokens to append
    keep_length: int  # cache length to keep before appending
    num_logits: int  # how many last positions to return rows for
    start: bool  # CONTROL_SEQUENCE_START
    end: bool  # CONTROL_SEQUENCE_END
    params: SamplingParams | None = None  # with TEMPERATURE: answer PROBS warped by these, else LOGITS
    decode: contract.Decode | None = None  # with DECODE_STEPS: sample tokens here, answer TOKENS
    sampled: tuple[int, ...] = ()  # a decode's tokens from its earlier forwards

    @property
    def is_release(self) -> bool:
        return not self.token_ids and self.num_logits == 0

    @property
    def prompt(self) -> tuple[int, ...]:
        """Its tokens up to the first position whose row it asks for (a first round's drafts follow them)."""
        return self.token_ids[: len(self.token_ids) - self.num_logits + 1]

    @property
    def position(self) -> int:
        """The position (index in the sequence) of the token its last row decides."""
        return self.keep_length + len(self.token_ids)


def _one_value(name: str, array: np.ndarray) -> int:
    if array.size != 1:
        raise ValueError(f"{name} must hold one value per request, got shape {list(array.shape)}")
    return int(array.reshape(-1)[0])


def read_request(sequence_id: int, read: Read) -> StepRequest:
    """A request's input tensors (``read(name)``: the array, or None if absent) -> StepRequest.

    ValueError, naming the tensor, for a malformed request."""
    arrays = {}
    for name in (contract.INPUT_IDS, contract.KEEP_LENGTH, contract.NUM_LOGITS):
        array = read(name)
        if array is None:
            raise ValueError(f"missing input {name}")
        arrays[name] = array
    ids = arrays[contract.INPUT_IDS]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"{contract.INPUT_IDS} must have shape [1, T], got {list(ids.shape)}")

    def flag(name: str) -> bool:
        array = read(name)
        return array is not None and bool(array.reshape(-1)[0])

    return StepRequest(
        sequence_id=sequence_id,
        token_ids=tuple(ids[0].tolist()),
        keep_length=_one_value(contract.KEEP_LENGTH, arrays[contract.KEEP_LENGTH]),
        num_logits=_one_value(contract.NUM_LOGITS, arrays[contract.NUM_LOGITS]),
        start=flag(contract.START),
        end=flag(contract.END),
        params=contract.sampling_from_tensors(read),
        decode=contract.decode_from_tensors(read),
    )


def validate(request: StepRequest, vocab_size: int) -> None:
    """ValueError for what is wrong with a request whatever the cache holds (the cache checks the rest)."""
    if request.sequence_id == 0:
        raise ValueError("sequence_id must be non-zero")
    if request.params is not None:
        request.params.validate_for_vocab(vocab_size)
    if request.keep_length < 0:
        raise ValueError(f"keep_length must be >= 0, got {request.keep_length}")
    if request.start and request.keep_length != 0:
        raise ValueError(f"a sequence starts with keep_length 0, got {request.keep_length}")
    if request.is_release:
        if not request.end:
            raise ValueError(
                f"a request without tokens is a release request and must set END "
                f"(sequence {request.sequence_id}, {contract.NUM_LOGITS} 0)"
            )
        return
    if not request.token_ids:
        raise ValueError("at least one token must be appended")
    if not 1 <= request.num_logits <= len(request.token_ids):
        raise ValueError(f"num_logits must be in [1, {len(request.token_ids)}] (tokens appended), "
                         f"got {request.num_logits}")
    if request.decode is not None:
        if request.params is None:
            raise ValueError(f"{contract.DECODE_STEPS} needs the sampling settings ({contract.TEMPERATURE})")
        if request.num_logits != 1:
            raise ValueError(f"{contract.DECODE_STEPS} needs {contract.NUM_LOGITS} 1, got {request.num_logits}")
        if request.decode.stop_token >= vocab_size:
            raise ValueError(f"{contract.STOP_TOKEN} {request.decode.stop_token} is outside the vocabulary")
    bad = [t for t in request.token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}")


def outputs(logits: torch.Tensor, params: SamplingParams | None) -> Outputs:
    """logits [N, V] -> LOGITS, or PROBS and PROBS_INDEX (warped, packed) when sampling settings came."""
    if params is None:
        return {contract.LOGITS: logits.cpu().numpy()[None]}  # [1, N, V]
    if logits.shape[0] == 0:
        values, index = logits.cpu().numpy(), None
    else:
        values, index = warp_packed(logits, params)  # [N, M] each, or [N, V] and None when dense
    if index is None:
        index = np.zeros((values.shape[0], 0), dtype=np.int32)
    return {contract.PROBS: values[None], contract.PROBS_INDEX: index[None]}  # [1, N, M], [1, N, M | 0]


def lookup_drafts(request: StepRequest, cache: KVCache, max_length: int, sequences: int = 1,
                  row_cost: float = ROW_COST) -> tuple[int, ...]:
    """The draft a decode's forward verifies besides its token: what `specdec.lookup` finds in the cache's
    first ``keep_length`` tokens and the request's own, no more than its LOOKUP, the tokens it still needs
    after this forward's last and the context's room allow, and only while the sequence's drafts pay in a
    forward of ``sequences`` (`specdec.lookup.Acceptance`); () for any other request."""
    decode = request.decode
    if decode is None or not decode.lookup or len(cache.ids) < request.keep_length:
        return ()
    room = min(decode.lookup, decode.steps - len(request.sampled) - 1, max_length - request.position)
    if room < 1:
        return ()
    drafts = propose([*cache.ids[: request.keep_length], *request.token_ids], room)
    return drafts[: cache.lookup.allowance(sequences, row_cost)] if drafts else ()


def decoded(
    logits: torch.Tensor, request: StepRequest, drafts: Sequence[int], forward: Outputs,
    on_lookup: Callable[[int, int], None] = lambda drafted, accepted: None,
) -> Outputs | StepRequest:
    """A decode request's tokens from its rows (logits [1 + len(drafts), V]: its last token's, then each
    draft's): the drafts it accepts and one more, drawn with the round rule (``on_lookup(drafted, accepted)``
    is told, with drafts). Its answer (TOKENS) when it has all its tokens or sampled the stop token, else
    its continuation, which feeds the last one next."""
    assert request.decode is not None and request.params is not None
    values, index = warp_packed(logits, request.params)
    rows = PackedRows.from_arrays(values, index, logits.shape[-1])
    decode = request.decode
    result = draw_round(  # q None: a looked-up draft is deterministic, its q one-hot
        drafts, None, rows, seed=decode.seed, greedy=request.params.greedy, reproducible=decode.reproducible,
        first=request.position,
    )
    if drafts:
        on_lookup(len(drafts), result.accepted)
    tokens = result.tokens
    sampled = (*request.sampled, *tokens)[: decode.steps]
    if decode.stop_token in sampled:
        sampled = sampled[: sampled.index(decode.stop_token) + 1]
    if len(sampled) < decode.steps and sampled[-1] != decode.stop_token:  # every token drawn was kept
        return replace(request, token_ids=(sampled[-1],), keep_length=request.position + len(tokens) - 1,
                       start=False, sampled=sampled)
    return {contract.TOKENS: np.array([sampled], dtype=np.int32), **forward}  # [1, n]


def refusal(exc: Exception, sequence_id: int) -> StepError:
    """The error a request gets for ``exc``; anything unexpected is INTERNAL with the traceback logged only."""
    if isinstance(exc, SequenceNotFoundError):
        return StepError(ErrorCode.NOT_FOUND, f"{contract.NOT_FOUND_PREFIX} {exc}; resend the prefix with START")
    if isinstance(exc, CapacityError):
        return StepError(ErrorCode.UNAVAILABLE, f"{contract.CAPACITY_PREFIX} {exc}")
    if isinstance(exc, ValueError):  # SequenceBusyError included
        return StepError(ErrorCode.INVALID_ARG, f"{contract.INVALID_PREFIX} {exc}")
    log.error("sequence_id=%d step failed", sequence_id, exc_info=exc)
    return StepError(ErrorCode.INTERNAL, f"{contract.INTERNAL_PREFIX} step failed in sequence {sequence_id} (see the Triton log)")


def drop_released(requests: Sequence[StepRequest | StepError]) -> list[StepRequest | StepError]:
    """The requests with each one whose sequence a later release request of the batch drops turned into a
    CANCELLED error, not run. A caller that gives up (the orchestrator's generation was cancelled) sends the
    release on the stream right behind what it had asked for; a forward run for it now (a 200-token prompt,
    a decode's remaining steps) would only delay every other sequence for an answer nobody reads."""
    released = {r.sequence_id: i for i, r in enumerate(requests)
                if isinstance(r, StepRequest) and r.is_release and r.end}
    return [
        StepError(ErrorCode.CANCELLED, f"sequence {r.sequence_id} was released before this request ran")
        if isinstance(r, StepRequest) and not r.is_release and i < released.get(r.sequence_id, -1) else r
        for i, r in enumerate(requests)
    ]


def waves(requests: Sequence[StepRequest | StepError]) -> list[list[int]]:
    """Indices of the requests in forwards of their own: one request per sequence per forward, in order."""
    result: list[list[int]] = []
    depth: dict[int, int] = {}
    for index, request in enumerate(requests):
        if isinstance(request, StepError):
            continue
        wave = depth.get(request.sequence_id, 0)
        depth[request.sequence_id] = wave + 1
        if wave == len(result):
            result.append([])
        result[wave].append(index)
    return result


def fit(requests: Sequence[StepRequest | StepError], wave: Sequence[int], budget: int,
        put_off: set[int]) -> dict[int, int]:
    """How many of its tokens each request of ``wave`` runs in this forward of at most ``budget`` tokens
    (0 = no limit; the rule is `specdec.forward_budget.share`): all of them, or the first part of a prompt.
    A request put off to a later forward is not in the result. A sequence put off or chunked here
    (``put_off`` collects it) runs nothing more in this batch, so its requests keep their order."""
    live = [i for i in wave if isinstance(requests[i], StepRequest) and requests[i].sequence_id not in put_off]
    sizes = [(len(requests[i].token_ids), requests[i].num_logits) for i in live]  # type: ignore[union-attr]
    runs: dict[int, int] = {}
    for index, (tokens, _), take in zip(live, sizes, share(sizes, budget)):
        if take is not None:
            runs[index] = take
        if take is None or take < tokens:
            put_off.add(requests[index].sequence_id)  # type: ignore[union-attr]
    return runs


def reuse_heads(
    prefix: PrefixCache | None, vocab_size: int, requests: Sequence[StepRequest | StepError]
) -> tuple[list[StepRequest | StepError], dict[int, Hit]]:
    """The requests with each valid START request that begins with a head ``prefix`` holds turned into the
    rest of its prompt after that head (``keep_length`` the head's tokens), and those hits by index."""
    rewritten, hits = list(requests), {}
    if prefix is None:
        return rewritten, hits
    for index, request in enumerate(requests):
        if not isinstance(request, StepRequest) or not request.start or request.is_release:
            continue
        try:
            validate(request, vocab_size)
        except ValueError:
            continue  # refused in its wave, as it came
        hit = prefix.match(request.prompt, len(request.prompt) - 1)  # its own rows still run
        if hit is not None:
            hits[index] = hit
            rewritten[index] = replace(request, token_ids=request.token_ids[hit.tokens :], keep_length=hit.tokens)
    return rewritten, hits


def _recorded(cache: KVCache, on_lookup: Callable[[int, int], None]) -> Callable[[int, int], None]:
    def looked_up(drafted: int, accepted: int) -> None:
        cache.lookup.add(drafted, accepted)
        on_lookup(drafted, accepted)

    return looked_up


def run_batch(
    engine: CausalLMEngine,
    store: SequenceStore[KVCache],
    requests: Sequence[StepRequest | StepError],
    on_forward: Callable[[int], None] = lambda sequences: None,
    on_lookup: Callable[[int, int], None] = lambda drafted, accepted: None,
    row_cost: float = ROW_COST,
    budget: int = 0,
    prefix: PrefixCache | None = None,
) -> list[Outputs | StepError | StepRequest]:
    """Answer every request (a StepError given stays the answer) with one forward per wave of distinct
    sequences (normally one), each answer with how many sequences and tokens its forward ran. A decode
    request that needs more forwards is answered with its continuation (a StepRequest: run it in a later
    batch). A release request (no tokens, NUM_LOGITS 0, END) drops the cache and returns [1, 0, V], and
    cancels what its sequence asked before it and has not run (`drop_released`); END on
    a normal request returns the rows, then drops the cache (a decode's, after its last forward); END
    always drops it, even when the request fails. ``on_forward(n)`` is told each forward's number of
    sequences, ``on_lookup(drafted, accepted)`` each decode's looked-up drafts (the metrics); ``row_cost``:
    a forward's cost per extra row over its cost alone (whether a lookup pays, `specdec.lookup.Acceptance`).
    ``budget``: the tokens a forward may run (0 = no limit, `fit`); a prompt that does not fit is answered
    with its continuation too (the rest of its tokens, or all of them when it was put off). ``prefix``: the
    shared prompt heads a START request starts from (`specdec.prefix_cache`), and learns from."""
    originals = drop_released(requests)
    requests, hits = reuse_heads(prefix, engine.vocab_size, originals)
    answers: list[Outputs | StepError | StepRequest] = list(originals)  # type: ignore[arg-type] - put off: as it came
    put_off: set[int] = set()
    for wave in waves(requests):
        runs = fit(requests, wave, budget, put_off)
        spare = budget - sum(runs.values()) if budget else None  # rows left for looked-up drafts
        entries: dict[int, Entry[KVCache]] = {}
        drafts: dict[int, tuple[int, ...]] = {}
        chunks: dict[int, StepRequest] = {}  # what is left of a prompt run in part
        prompts: dict[int, tuple[int, ...]] = {}  # START requests' prompts (the prefix cache learns them)
        items: list[tuple[int, StepItem]] = []
        for index in wave:
            request, original = requests[index], originals[index]
            assert isinstance(request, StepRequest) and isinstance(original, StepRequest)
            if index not in runs:
                continue  # put off: its answer is itself, for a later forward
            try:
                validate(original, engine.vocab_size)
                if request.is_release:
                    answers[index] = outputs(torch.zeros(0, engine.vocab_size), request.params)
                    continue
                entry = store.checkout(request.sequence_id, start=request.start)
                if prefix is not None and index in hits:
                    prefix.fill(entry.state, hits[index], len(original.token_ids))
            except Exception as exc:  # noqa: BLE001 - every refusal is this request's answer
                answers[index] = refusal(exc, request.sequence_id)
                continue
            entries[index] = entry
            if request.start:
                prompts[index] = original.prompt
            if (take := runs[index]) < len(request.token_ids):
                chunks[index] = replace(request, token_ids=request.token_ids[take:],
                                        keep_length=request.keep_length + take, start=False)
                items.append((index, StepItem(entry.state, request.keep_length, request.token_ids[:take], 0)))
                continue
            drafts[index] = lookup_drafts(request, entry.state, engine.max_length, len(runs), row_cost)
            if spare is not None:
                drafts[index] = drafts[index][: max(spare, 0)]
                spare -= len(drafts[index])
            items.append((index, StepItem(entry.state, request.keep_length, request.token_ids + drafts[index],
                                          request.num_logits + len(drafts[index]))))
        try:
            if items:
                on_forward(len(items))
                results = engine.step([item for _, item in items])
                forward = {  # [1, 1] each
                    contract.FORWARD_SEQUENCES: np.array([[len(items)]], dtype=np.int32),
                    contract.FORWARD_TOKENS: np.array([[sum(len(i.token_ids) for _, i in items)]], dtype=np.int32),
                }
                for (index, _), result in zip(items, results):
                    request = requests[index]
                    if prefix is not None and index in prompts and not isinstance(result, ValueError):
                        prefix.learn(prompts[index], entries[index].state)
                    if isinstance(result, ValueError):
                        answers[index] = refusal(result, request.sequence_id)
                    elif index in chunks:
                        answers[index] = chunks[index]
                    elif request.decode is not None:
                        own = {contract.FORWARD_TOKENS: forward[contract.FORWARD_TOKENS] - len(drafts[index])}
                        answers[index] = decoded(result, request, drafts[index], {**forward, **own},
                                                 _recorded(entries[index].state, on_lookup))
                    else:
                        answers[index] = {**outputs(result, request.params), **forward}
        except Exception as exc:  # noqa: BLE001 - a failed forward fails its requests, never the server
            for index, _ in items:
                answers[index] = refusal(exc, requests[index].sequence_id)
        finally:
            for entry in entries.values():
                store.checkin(entry)
            for index in wave:
                request = requests[index]
                if request.end and not isinstance(answers[index], StepRequest):
                    store.release(request.sequence_id)
    return answers


def run_to_completion(
    engine: CausalLMEngine,
    store: SequenceStore[KVCache],
    requests: Sequence[StepRequest | StepError],
    on_forward: Callable[[int], None] = lambda sequences: None,
    on_lookup: Callable[[int, int], None] = lambda drafted, accepted: None,
    row_cost: float = ROW_COST,
    budget: int = 0,
    prefix: PrefixCache | None = None,
) -> list[Outputs | StepError]:
    """`run_batch` until every decode has all its tokens and every prompt ran: the answers, in order (for
    callers without a scheduler to hand continuations to)."""
    answers = run_batch(engine, store, requests, on_forward, on_lookup, row_cost, budget, prefix)
    while pending := [i for i, answer in enumerate(answers) if isinstance(answer, StepRequest)]:
        again = run_batch(engine, store, [answers[i] for i in pending], on_forward, on_lookup, row_cost, budget,
                          prefix)
        for i, answer in zip(pending, again):
            answers[i] = answer
    return answers  # type: ignore[return-value]
