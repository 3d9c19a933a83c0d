"""Choosing K per round from what this orchestrator measures, down to 0 when speculation does not pay.

Why it exists: a fixed K makes every request slower whenever the draft costs more than it saves (a model
draft on a CPU; a lookup drafter on text that never repeats; a target whose verify cost grows under load).
Before each round the loop asks `KPolicy.choose` for K; after it, `KPolicy.observe` learns from it. Pure
Python: no asyncio, grpc or clock here, so tests drive it with scripted rounds.

The model (Leviathan et al. 2023, §3, with measured costs instead of assumed ones):

* **Acceptance per draft position.** a_i = P(position i yields an accepted token | positions < i did and
  K >= i): the drafter proposed it *and* the target accepted it, so a lookup drafter with nothing to
  propose counts as a miss. Per generation, smoothed towards a process-wide prior per (drafter, sampling
  mode) that every generation feeds. E[tokens | K] = 1 + Σ_{j<=K} Π_{i<=j} a_i.
* **Proposal length.** P(a drafter proposes at least i tokens), per (drafter, mode): a lookup drafter
  proposes fewer than K when its match runs out, and the target scores only what was proposed.
* **Costs, as measured now** (process-wide; they grow with load): the target's time for a round whose
  forward ran X tokens in all (FORWARD_TOKENS, in every answer of the target), T(X) = α + β X, and the
  draft's time for a round that proposed m tokens, D(m) = a + b m, each fitted by exponentially
  forgetting least squares over recent rounds, with a weak prior on the slope where the data have no
  spread; the tokens the other sequences bring to a forward, X_o; the orchestrator's own time per round, o.
  A round that proposes m tokens takes T(X_o + 1 + m). (The slope is fitted against the forward's tokens,
  not the round's own: under load the others' K moves with this one's, and a fit on the round's own
  tokens would count their drafts as its cost.)
* **What a round costs the others.** The target runs every ready sequence in one forward, so the time a
  round's drafts add to that forward, β m, every other sequence in it waits too. With s the sequences per
  forward lately (FORWARD_SEQUENCES), a round is charged its own time plus (s − 1) β m: the marginal cost
  to everyone, so each generation's choice maximises what the whole batch gets (SmartSpec's goodput, per
  sequence). Alone (s = 1, X_o = 0) it is just its own time; under load speculation must pay for the
  others' wait, and a drafter that barely pays alone is turned off. The draft call holds the others up
  too: the target holds its next forward for a sequence of the last one on its way back, and a round
  that drafts comes back a draft call later than a sequence that decodes. Sequences that all draft wait
  for their calls side by side; so with d the share of recent forwards spent decoding (every
  generation's), a round is also charged (s − 1) d D(m̄).
* **Choice.** rate(K) = E[tokens | K] / (D(m̄) + T(X_o + 1 + m̄) + (s − 1)(β m̄ + d D(m̄)) + o) with
  m̄ = E[m | K], rate(0) = 1 / c0 (below). K = argmax; 0 unless the best K beats target-only by ``margin``.
* **Exploring.** A K that never changes measures one point of each cost curve, and the costs move with
  load; so while drafting, every ``explore_every``-th round runs a neighbouring K (one less, one more,
  alternately), which costs little near the optimum and keeps the slopes measured as they are now.
* **K = 0, measured as well as modelled.** With speculation off the target decodes several tokens per
  round (the loop's ``target_steps``; its time is learnt from as that many one-token rounds, so the line
  holds what target-only costs per token), each forward also verifying drafts the target looks up itself
  (``target_lookup``), which the line cannot know of. So the cost of a K = 0 token is the lower of the
  line's, T(X_o + 1) + o, and c0: what this generation's K = 0 rounds cost per token, smoothed towards the
  process-wide figure per sampling mode and scaled by T(X_o + 1) now over then (the load moves). On text
  that repeats, the target's lookups put c0 well under a step; under load, where they are rarely worth a
  row, the line's figure stands. A decoded round counts its tokens in the wait for a probe. While
  drafting, every ``4 * explore_every``-th round runs K = 0 when its rate is within reach (and at the
  first chance, before its own c0 is known), so a generation measures its own c0.
* **Probes.** After ``probe_rounds`` rounds with speculation off, one round runs with the K speculation
  would use, so a text that became predictable gets drafts again; each probe that does not pay doubles
  the wait, up to ``probe_rounds_max``. A generation probes on its own only while at least its wait's worth
  of tokens is left, for what the probe finds to pay back over. (32-token generations of the README prompts,
  8 in flight: with a probe due after 16 tokens off, half of them probed at the third of their four rounds,
  the target's forwards took 4–13 % longer than target-only's for as many, and auto came to 0.94× [0.88,
  1.00] target-only over 12 rounds; with this rule 15 of 128 probed, through the count below, and the
  forwards took as long as target-only's.) Generations shorter than that wait (a few tokens each) never
  reach it, and a drafter the process-wide figures once judged not to pay would stay off for them for
  good; so every generation's rounds off with the drafter and sampling mode are counted too
  (`SharedEstimates.off_rounds`, `probe_now`), and once they exceed ``probe_rounds_max`` since the last
  probe, the round that gets there probes, whichever generation's. A probe costs what its drafting adds to a round
  (for a model draft on a CPU, several target steps, plus catching the draft's cache up), so the wait is
  also long enough that probes cost at most ``probe_budget`` of the time spent with speculation off: a
  free lookup probes every ``probe_rounds``, an expensive draft rarely; among decoding sequences, a
  probe's price includes their wait for its draft call, (s − 1) d D(m̄). (A round whose lookup drafter
  finds nothing decodes: the loop's doing. Here it is a miss at every position, and a probe's decoded
  tokens count towards the next wait.)

Exactness is untouched: K depends only on past rounds, never on the current round's random draws.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

GREEDY, SAMPLE = "greedy", "sample"
_OFF_PRIOR_TOKENS = 8.0  # how many tokens of a generation's own K = 0 rounds the process-wide c0 weighs
_WITHIN_REACH = 0.7  # K = 0 is explored while drafting only when its rate is at least this share of the best


@dataclass(frozen=True)
class PolicySettings:
    """Bounds and pacing of the K policy."""

    max_k: int = 16  # the largest K auto may choose
    probe_rounds: int = 16  # rounds with speculation off before a probe round
    probe_rounds_max: int = 256  # the longest wait between probes (each probe that does not pay doubles it)
    prior_rounds: float = 4.0  # how many rounds of a generation the process-wide prior weighs
    explore_every: int = 8  # while drafting, every this many rounds runs K - 1 or K + 1 instead (alternately)
    margin: float = 0.03  # speculation must beat target-only by this fraction to be chosen
    probe_budget: float = 0.02  # probes may add at most this share to the time spent with speculation off
    half_life_rounds: float = 256.0  # process-wide estimates forget a sample's weight by half over these rounds

    def __post_init__(self) -> None:
        if self.max_k < 0 or self.probe_rounds < 1 or self.probe_rounds_max < self.probe_rounds:
            raise ValueError("need max_k >= 0 and 1 <= probe_rounds <= probe_rounds_max")
        if not 0 < self.probe_budget <= 1:
            raise ValueError(f"probe_budget must be in (0, 1], got {self.probe_budget}")


@dataclass(frozen=True)
class Choice:
    """The policy's K for a round."""

    k: int
    off: bool = False  # K = 0 because drafting does not pay now
    probe: bool = False  # speculation is off, but this round tries it again


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did, for the policy to learn from (times in seconds)."""

    k: int  # K asked of the draft (0 = target-only)
    proposed: int  # tokens the draft proposed (<= k)
    accepted: int  # drafts the target accepted (<= proposed)
    draft_s: float  # waiting on the draft (0 when K = 0)
    target_s: float  # waiting on the target
    other_s: float  # the rest of the round: the orchestrator's own work
    forward_sequences: int = 1  # sequences in the target forward that scored this round (1 = alone)
    forward_tokens: int = 0  # tokens that forward ran in all, this round's included (0 = not known: alone)
    steps: int = 1  # tokens the target decoded on its own (a K = 0 round's decode)
    speculating: bool = True  # False for a request that set K = 0: its decodes skip the target's lookups, so
    # its K = 0 rounds do not measure what auto's cost (c0)


class _Line:
    """y ≈ intercept + slope · x by least squares with exponential forgetting; where the samples have no
    spread in x, the slope falls back to a prior, ``prior(mean x, mean y)``."""

    def __init__(self, decay: float, prior: Callable[[float, float], float]) -> None:
        self.decay, self.prior = decay, prior
        self.w = self.wx = self.wy = self.wxx = self.wxy = 0.0

    def add(self, x: float, y: float, weight: float = 1.0) -> None:
        d, w = self.decay, weight
        self.w, self.wx, self.wy = d * self.w + w, d * self.wx + w * x, d * self.wy + w * y
        self.wxx, self.wxy = d * self.wxx + w * x * x, d * self.wxy + w * x * y

    @property
    def known(self) -> bool:
        return self.w > 0

    def at(self, x: float) -> float:
        mx, my = self.wx / self.w, self.wy / self.w
        sxx, sxy = self.wxx - self.w * mx * mx, self.wxy - self.w * mx * my
        ridge = 1.0  # one sample's worth of pull towards the prior slope
        slope = max(0.0, (sxy + ridge * self.prior(mx, my)) / (sxx + ridge))
        return max(0.0, my + slope * (x - mx))


class _PerToken:
    """Seconds per token over rounds, each weighing its tokens, and the other sequences' tokens per forward
    while they ran; with ``decay``, older rounds weigh less."""

    def __init__(self, decay: float = 1.0) -> None:
        self.decay, self.seconds, self.tokens, self.others = decay, 0.0, 0.0, 0.0

    def add(self, seconds: float, tokens: int, others: float) -> None:
        d = self.decay
        self.seconds, self.tokens = d * self.seconds + seconds, d * self.tokens + tokens
        self.others = d * self.others + others * tokens

    def blend(self, prior: tuple[float, float] | None, prior_tokens: float) -> tuple[float, float] | None:
        """(seconds per token, others' tokens) pulled towards ``prior`` as if it were ``prior_tokens`` tokens
        more; None when neither is known."""
        if prior is None:
            return (self.seconds / self.tokens, self.others / self.tokens) if self.tokens else None
        weight = self.tokens + prior_tokens
        return ((self.seconds + prior_tokens * prior[0]) / weight, (self.others + prior_tokens * prior[1]) / weight)


@dataclass
class _Counts:
    """Per draft position i (index i-1): rounds that reached it, and how many of those it paid."""

    reached: list[float] = field(default_factory=list)
    hits: list[float] = field(default_factory=list)

    def grow(self, n: int) -> None:
        while len(self.reached) < n:
            self.reached.append(0.0)
            self.hits.append(0.0)

    def add(self, k: int, successes: int, decay: float = 1.0) -> None:
        """A round asked K = k; positions 1..successes paid, position successes+1 (if <= k) did not."""
        self.grow(k)
        if decay != 1.0:
            self.reached = [r * decay for r in self.reached]
            self.hits = [h * decay for h in self.hits]
        for i in range(min(k, successes + 1)):
            self.reached[i] += 1
            if i < successes:
                self.hits[i] += 1

    def rate(self, i: int, prior: float, weight: float) -> float:
        reached = self.reached[i] if i < len(self.reached) else 0.0
        hits = self.hits[i] if i < len(self.hits) else 0.0
        return (hits + weight * prior) / (reached + weight)

    def pooled(self, prior: float) -> float:
        """The rate over every position (one pseudo-round of ``prior``): what a position not tried yet is
        expected to do (Leviathan's α is one rate for all positions)."""
        return (sum(self.hits) + prior) / (sum(self.reached) + 1)


class SharedEstimates:
    """What every generation of this process learns and starts from. Thread-safe."""

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self._decay = 0.5 ** (1.0 / settings.half_life_rounds)
        self._lock = threading.Lock()
        self._accepted: dict[tuple[str, str], _Counts] = {}  # (drafter, mode) -> accepted per position
        self._proposed: dict[tuple[str, str], _Counts] = {}  # (drafter, mode) -> proposed at least i
        # The target: seconds vs the tokens its forward ran; with no spread, each token costs a tenth of one
        # sequence's share of a forward (between a GPU's ~0 and this CPU's ~0.12 of a step).
        self._target = _Line(self._decay, prior=lambda mx, my: 0.1 * my / self._sharing_now())
        self._others = _Line(self._decay, prior=lambda mx, my: 0.0)  # the other sequences' tokens per forward
        self._draft: dict[str, _Line] = {}  # drafter -> seconds vs tokens proposed
        self._other = _Line(self._decay, prior=lambda mx, my: 0.0)
        self._sharing = _Line(self._decay, prior=lambda mx, my: 0.0)  # sequences per target forward
        self._decoding = _Line(self._decay, prior=lambda mx, my: 0.0)  # the share of forwards spent decoding
        self._off: dict[str, _PerToken] = {}  # sampling mode -> what K = 0 rounds cost per token
        self._probes: dict[tuple[str, str], int] = {}  # (drafter, mode) -> all rounds off since the last probe

    def _sharing_now(self) -> float:
        return max(1.0, self._sharing.at(0)) if self._sharing.known else 1.0

    def observe(self, drafter: str, mode: str, outcome: RoundOutcome) -> None:
        with self._lock:
            own = 1 + outcome.proposed
            forward = max(own, outcome.forward_tokens)
            self._others.add(0, forward - own)
            self._sharing.add(0, max(1, outcome.forward_sequences))
            steps = max(1, outcome.steps)  # a decode's forwards; its round trip is shared by its tokens
            self._decoding.add(0, 1.0 if steps > 1 or outcome.k == 0 else 0.0, weight=steps)
            if outcome.k == 0 and outcome.speculating:
                off = self._off.setdefault(mode, _PerToken(self._decay))
                off.add(outcome.target_s + outcome.other_s, steps, forward - own)
            self._target.add(forward, outcome.target_s / steps)
            self._other.add(0, outcome.other_s / steps)
            if outcome.k > 0:
                key = (drafter, mode)
                self._accepted.setdefault(key, _Counts()).add(outcome.k, outcome.accepted, self._decay)
                self._proposed.setdefault(key, _Counts()).add(outcome.k, outcome.proposed, self._decay)
                # A draft with no spread in its proposals' lengths: assume its time grows with them (a model's
                # forwards); a lookup's proposals vary in length, and the fit finds its flat cost.
                line = self._draft.setdefault(drafter, _Line(self._decay, prior=lambda mx, my: my / (mx + 1)))
                line.add(outcome.proposed, outcome.draft_s)

    def off_rounds(self, drafter: str, mode: str, rounds: int) -> None:
        """Count ``rounds`` with speculation off (every generation's) towards the next probe."""
        with self._lock:
            self._probes[(drafter, mode)] = self._probes.get((drafter, mode), 0) + rounds

    def probe_now(self, drafter: str, mode: str, affordable: int, due: bool) -> bool:
        """A round off is chosen: count it, and whether it probes instead. It does when the generation's own
        wait says so (``due``), or when every generation's rounds off since the last probe exceed both
        ``probe_rounds_max`` and ``affordable``, so that generations shorter than their own wait still probe
        now and then. A probe starts the count again."""
        with self._lock:
            key = (drafter, mode)
            count = self._probes.get(key, 0) + 1
            probe = due or count > max(self.settings.probe_rounds_max, affordable)
            self._probes[key] = 0 if probe else count
            return probe

    def speculating(self, drafter: str, mode: str) -> None:
        """A generation drafts with this drafter: its rounds off start again from none."""
        with self._lock:
            self._probes[(drafter, mode)] = 0

    def snapshot(self, drafter: str, mode: str) -> _Snapshot:
        with self._lock:
            accepted = self._accepted.get((drafter, mode), _Counts())
            proposed = self._proposed.get((drafter, mode), _Counts())
            k = self.settings.max_k
            others = self._others.at(0) if self._others.known else 0.0
            accept, propose = accepted.pooled(0.5), proposed.pooled(1.0)
            return _Snapshot(
                accept=[accepted.rate(i, accept, 1.0) for i in range(k)],
                propose=[proposed.rate(i, propose, 1.0) for i in range(k)],
                target=[self._target.at(others + 1 + n) if self._target.known else 0.0 for n in range(k + 1)],
                draft=[self._draft[drafter].at(m) if drafter in self._draft else 0.0 for m in range(k + 1)],
                other=self._other.at(0) if self._other.known else 0.0,
                sharing=self._sharing_now(),
                decoding=self._decoding.at(0) if self._decoding.known else 0.0,
                others=others,
                off=self._off[mode].blend(None, 0.0) if mode in self._off else None,
                line=(self._target.at(0), self._target.at(1) - self._target.at(0)) if self._target.known else None,
            )


@dataclass(frozen=True)
class _Snapshot:
    accept: list[float]  # process-wide a_i, i = 1..max_k
    propose: list[float]  # process-wide P(proposes >= i | asked >= i)
    target: list[float]  # T(X_o + 1 + n): the round's target time when it proposes n = 0..max_k tokens
    draft: list[float]  # D(m) for m = 0..max_k
    other: float
    sharing: float  # sequences per target forward, recently
    decoding: float  # the share of recent forwards (every generation's) spent decoding, not drafting
    others: float  # the other sequences' tokens per target forward, recently (X_o)
    off: tuple[float, float] | None  # K = 0 rounds lately, process-wide: seconds per token, others' tokens
    line: tuple[float, float] | None  # T(X) = line[0] + line[1] X, the scored rounds' fit (None: none yet)

    def off_now(self, off: tuple[float, float], others_now: float) -> float:
        """What a K = 0 round costs per token at today's load: its measured cost, scaled by how much longer
        the target's forward is with the others' tokens now than when it was measured."""
        seconds, others_then = off
        if self.line is None:
            return seconds
        intercept, slope = self.line
        then, now = intercept + slope * (others_then + 1), intercept + slope * (others_now + 1)
        return seconds * now / then if then > 0 else seconds


class KPolicy:
    """One generation's K: the best rate from its own rounds and the process-wide estimates."""

    def __init__(self, shared: SharedEstimates, drafter: str, mode: str) -> None:
        self.shared, self.drafter, self.mode = shared, drafter, mode
        self.settings = shared.settings
        self._accepted = _Counts()  # this generation's own rounds
        self._proposed = _Counts()
        self._off = 0  # rounds in a row with speculation off
        self._wait = self.settings.probe_rounds  # rounds off before the next probe
        self._drafting = 0  # rounds in a row with speculation on
        self._own_off = _PerToken()  # this generation's K = 0 rounds

    def choose(self, limit: int) -> Choice:
        """K for the next round, at most ``limit`` (the tokens left to generate, minus one)."""
        top = min(self.settings.max_k, max(limit, 0))
        if top == 0:
            return Choice(0)
        tokens, costs = self.outlook(top)
        rates = [_rate(t, c) for t, c in zip(tokens, costs)]
        best = max(range(1, top + 1), key=lambda k: rates[k])
        if rates[best] > rates[0] * (1 + self.settings.margin):
            self._off, self._wait = 0, self.settings.probe_rounds
            if not self._drafting:
                self.shared.speculating(self.drafter, self.mode)
            self._drafting += 1
            if self._drafting % self.settings.explore_every == 0 and (
                not self._own_off.tokens  # its own c0 unknown: the process-wide one is another text's
                or self._drafting % (4 * self.settings.explore_every) == 0 and rates[0] > _WITHIN_REACH * rates[best]
            ):
                return Choice(0)  # K = 0 as it runs now (its lookups depend on this text): measure c0
            if self._drafting % self.settings.explore_every == 0:  # a neighbour: costs hardly anything near the
                step = 1 if self._drafting // self.settings.explore_every % 2 else -1  # optimum, and measures
                return Choice(min(max(best + step, 0), top))  # the cost's slope as it is now
            return Choice(best)
        self._drafting = 0
        self._off += 1
        affordable = self._affordable_wait(costs[best] - costs[0], costs[0])
        wait = max(self._wait, affordable)
        if self.shared.probe_now(self.drafter, self.mode, affordable, due=self._off > wait and limit >= wait):
            self._off, self._wait = 0, min(2 * self._wait, self.settings.probe_rounds_max)
            return Choice(best, probe=True)  # one round as speculation would run it
        return Choice(0, off=True)

    def _affordable_wait(self, probe_cost: float, off_round: float) -> int:
        """Rounds off for a probe costing ``probe_cost`` (s, beyond a round off) to stay within the budget."""
        if probe_cost <= 0 or off_round <= 0:
            return 0
        rounds = probe_cost / (self.settings.probe_budget * off_round)
        return min(math.ceil(rounds), self.settings.probe_rounds_max)

    def observe(self, outcome: RoundOutcome) -> None:
        if outcome.steps > 1 and not self._drafting:  # the wait for a probe counts tokens, however many a round
            self._off += outcome.steps - 1  # decoded (so does a probe whose drafter found nothing)
            self.shared.off_rounds(self.drafter, self.mode, outcome.steps - 1)
        if outcome.k == 0 and outcome.speculating:
            others = max(0, outcome.forward_tokens - 1)
            self._own_off.add(outcome.target_s + outcome.other_s, max(1, outcome.steps), others)
        if outcome.k > 0:
            self._accepted.add(outcome.k, outcome.accepted)
            self._proposed.add(outcome.k, outcome.proposed)
        self.shared.observe(self.drafter, self.mode, outcome)

    def rates(self, top: int) -> list[float]:
        """Expected tokens per second for K = 0..top (index K)."""
        return [_rate(t, c) for t, c in zip(*self.outlook(top))]

    def outlook(self, top: int) -> tuple[list[float], list[float]]:
        """Expected tokens of a round and its expected seconds, for K = 0..top (index K)."""
        shared = self.shared.snapshot(self.drafter, self.mode)
        weight = self.settings.prior_rounds
        accept = [self._accepted.rate(i, shared.accept[i], weight) for i in range(top)]
        propose = [self._proposed.rate(i, shared.propose[i], weight) for i in range(top)]
        off = self._own_off.blend(shared.off, _OFF_PRIOR_TOKENS)
        tokens = [1.0]
        modelled = shared.target[0] + shared.other  # T(X_o + 1) + o, the line's target-only token
        costs = [modelled if off is None else min(shared.off_now(off, shared.others), modelled or math.inf)]
        expected, reach, at_least, proposed = 1.0, 1.0, 1.0, 0.0
        others = max(0.0, shared.sharing - 1.0)  # the sequences a longer request slows down with it
        for k in range(1, top + 1):
            reach *= accept[k - 1]  # P(drafts 1..k all accepted)
            expected += reach
            at_least *= propose[k - 1]  # P(the draft proposes >= k tokens)
            proposed += at_least  # E[tokens proposed | K = k]
            tokens.append(expected)
            target = _interpolate(shared.target, proposed)
            extra = (target - shared.target[0]) * others  # the same wait, for each of the others
            drafting = _interpolate(shared.draft, proposed)
            holding = drafting * others * shared.decoding  # the decoding others wait for its draft call
            costs.append(drafting + target + extra + holding + shared.other)
        return tokens, costs


def _interpolate(values: list[float], x: float) -> float:
    low = min(int(x), len(values) - 1)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (x - low)


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else math.inf if tokens else 0.0
