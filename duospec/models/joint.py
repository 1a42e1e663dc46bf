"""Continuous batching: the forwards of several generating threads run as one pass per model.

Each request generates in its own thread with its own lane (a Model of its own over a shared cache:
models/llamacpp.py's or models/hf_lanes.py's `split_lanes`), through the same round loop as a request alone. A lane's
`forward` prepares its pass and hands it here. Once every member thread waits on a forward, all pending
passes run, one joint decode per model (target lanes together, draft lanes together), and every thread
goes on with its own logits. So a round serves every active request, requests join and leave between
passes, and no request waits for another's whole answer.

A prompt's pass is cut into chunks (budget/batch.py's prefill_chunk, read through `prompt_chunk`):
beside other requests, chunks the cost curve prices at most FAIR_SLOWDOWN times their own pass,
so a long prompt delays their tokens by a bounded factor instead of by its whole prefill; a prompt
tail no longer than one lone chunk goes in whole (a short request is not made to crawl beside a long
one). Alone, chunks of the width that already prefills at full speed; a request that joins meanwhile
stops the chunk in flight (`interrupt`: nothing of it stays in the cache), so it never waits for one
(llama.cpp's CPU backend checks the stop flag between graph nodes, transformers lanes between decoder
layers; llama.cpp's GPU backends finish the chunk). Only chunks cut from a longer prompt can be
stopped: a prompt's last piece would run again at the same width.

A round's target pass (a tree, a chain) follows the same rule: alone, a pass wider than what is fair
beside one more request is stopped by a request that joins, and a pass drafted alone that meets a
request joined meanwhile is not started; either way PassPreempted reaches the round loop, which
scores the tree's first nodes, as many as are fair now (engines/rounds.py). A SpecExec tree of
hundreds of tokens so never holds a newcomer's first token for its whole pass. Likewise a lone
level of a SpecExec search on the draft (a pass that extends an open tree): stopped, the search
proposes the tree it has.

Only one member thread runs Python at a time: it holds the baton from the moment it joins until it
waits on a forward or leaves. The rounds of different requests then never interleave inside shared
Python state (the suffix history, the tokenizer, the cost book), and when every member waits, the
thread that arrives last runs the joint pass itself (no scheduler thread, no hand-off).

The passes a lane joins are recorded on it (`last_batch`: the tokens and lanes beside its own), which
is what a batch-aware budget prices its next draft with (budget/batch.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch


class PassPreempted(Exception):
    """A pass stopped (or not started) because a request joined; nothing of it stays in the cache. A
    prompt chunk's forward runs it again, priced for the batch that now includes the newcomer; a
    round's tree pass raises it to the round loop, which narrows the tree (engines/rounds.py)."""


class JointPass(Protocol):
    """A backend's prepared forward (models/llamacpp.py's PreparedPass, models/hf_lanes.py's LanePass)."""

    model: object  # the lane: prepare_forward, finish_forward, abandon_forward, interrupt, last_batch
    token_ids: object  # its tokens (len() is the pass's size)
    last_only: bool  # a prompt's pass (logits of its last token only)
    preemptible: bool  # a pass a joining request may stop (PassPreempted): a prompt chunk, or a wide lone tree
    extends_tree: bool  # it grows a draft's open tree (a SpecExec search level), which may stop when alone

    @property
    def joint_key(self) -> object:
        """Passes with equal keys run in one call of `run_together`."""
        ...

    @staticmethod
    def run_together(passes: list) -> None:
        """Run passes of one joint key as one pass of their model, filling each one's outputs."""
        ...


@dataclass
class PassRecord:
    """One joint pass, for the server's metrics: lanes in it, tokens, lanes that scored drafts."""

    key: object  # the passes' joint_key: which model ran it
    lanes: int
    tokens: int
    drafting_lanes: int  # lanes whose pass held more than their next token (a prompt's pass excluded)
    prompt_lanes: int  # lanes whose pass was a prompt's
    seconds: float


@dataclass
class _Call:
    prepared: JointPass
    done: bool = False
    error: BaseException | None = None


@dataclass
class JointPasses:
    """The rendezvous of the member threads' forwards (see the module docstring). Passes of one model
    run through their own backend's `run_together`; on_pass is told of every joint pass (the server's
    metrics)."""

    on_pass: Callable[[PassRecord], None] | None = None
    # Prompt tokens a pass may take beside n other requests (budget/batch.py's prefill_chunk; n = 0:
    # the width that prefills at full speed), so a long prompt neither holds up their next tokens nor
    # keeps a newcomer out for its whole prefill; None: a prompt takes one pass.
    prefill_chunk: Callable[[int], int] | None = None
    # The joint key of the target's passes: a lone target pass wider than what is fair beside one more
    # request can be stopped by a request that joins, and its round narrows the tree (engines/rounds.py).
    target_key: object = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _baton_held: bool = False
    _members: int = 0
    _pending: list[_Call] = field(default_factory=list)
    _stoppable: list[JointPass] = field(default_factory=list)  # stoppable passes in flight (prompt chunks, a wide lone tree)

    @property
    def members(self) -> int:
        """Threads generating now (the batch in flight)."""
        return self._members

    @contextmanager
    def member(self) -> Iterator[None]:
        """A thread's whole generation: it joins, waits for the baton, runs, and leaves; a thread that
        leaves while all others wait runs their pass before it goes. It counts as a member from the
        moment it joins, so the next pass waits for its first forward (that is how it joins a batch)."""
        with self._cond:
            self._members += 1
            for prepared in self._stoppable:  # prompt chunks, or a wide lone tree: stop them, this one joins now
                prepared.model.interrupt()
            self._take_baton()
        try:
            yield
        finally:
            with self._cond:
                self._members -= 1
                if self._pending and len(self._pending) == self._members:
                    self._run_pending()
                self._give_baton()

    def prompt_chunk(self, remaining: int) -> int:
        """How many of its `remaining` prompt tokens the calling thread's next pass may take, priced
        by the other requests beside it; a tail no longer than one lone chunk goes in whole (one pass
        of at most that width beside them, rather than a short request crawling beside a long one)."""
        if self.prefill_chunk is None:
            return remaining
        alone = self.prefill_chunk(0)
        if remaining <= alone:
            return remaining
        return min(remaining, self.prefill_chunk(self._members - 1))

    def forward(self, prepared: JointPass) -> torch.Tensor:
        """Called by a lane's forward in a member thread: wait for (or run) the joint pass holding
        this one, then return its logits."""
        call = _Call(prepared)
        with self._cond:
            if prepared.preemptible and len(prepared.token_ids) > self.prefill_chunk(self._members - 1):
                # A request joined between this chunk's pricing and now: it is too wide for the batch
                # it would run in; priced again (nothing of it ran). (A cut chunk implies a chunk rule.)
                prepared.model.abandon_forward(prepared)
                raise PassPreempted(f"{prepared.model.name}: a prompt chunk priced before a request joined")
            if self._wide_target_pass(prepared):
                if self._members > 1:  # a tree drafted while alone, now beside a request that joined: narrowed first
                    prepared.model.abandon_forward(prepared)
                    raise PassPreempted(f"{prepared.model.name}: a tree drafted before a request joined")
                prepared.preemptible = True  # alone: a request that joins stops it (member), its round narrows it
            elif prepared.extends_tree and self._members == 1 and len(prepared.token_ids) > 1:
                prepared.preemptible = True  # a lone search level: stopped, the search proposes what it has (drafting/specexec.py)
            self._pending.append(call)
            if len(self._pending) >= self._members:
                self._run_pending()
            else:
                self._give_baton()
                while not call.done:
                    self._cond.wait()
                self._take_baton()
        if call.error is not None:
            raise call.error
        return prepared.model.finish_forward(prepared)

    def _wide_target_pass(self, prepared: JointPass) -> bool:
        """A target pass, not a prompt's, wider than what is fair beside the others, or alone, beside
        one request more (prefill_chunk prices both: the others' next tokens and this pass's)."""
        if self.prefill_chunk is None or self.target_key is None or prepared.last_only or prepared.joint_key != self.target_key:
            return False
        return len(prepared.token_ids) > self.prefill_chunk(max(1, self._members - 1))

    def _take_baton(self) -> None:
        while self._baton_held:
            self._cond.wait()
        self._baton_held = True

    def _give_baton(self) -> None:
        self._baton_held = False
        self._cond.notify_all()

    def _run_pending(self) -> None:
        """Run every pending pass, one joint call per model, with the lock released (the caller keeps
        the baton, so no member runs meanwhile); then wake their threads."""
        calls, self._pending = self._pending, []
        groups: dict[object, list[_Call]] = {}
        for call in calls:
            groups.setdefault(call.prepared.joint_key, []).append(call)
        if all(call.prepared.preemptible for call in calls):  # nobody decodes: a joining request may stop it
            self._stoppable = [call.prepared for call in calls]
        self._cond.release()
        try:
            for group in groups.values():
                self._run_group(group)
        finally:
            self._cond.acquire()
            for prepared in self._stoppable:
                prepared.model.interrupt(False)
            self._stoppable = []
            for call in calls:
                call.done = True
            self._cond.notify_all()

    def _run_group(self, group: list[_Call]) -> None:
        passes = [call.prepared for call in group]
        sizes = [len(prepared.token_ids) for prepared in passes]
        start = time.perf_counter()
        try:
            passes[0].run_together(passes)
        except BaseException as error:  # every pass of the group failed or stopped: each lane drops what it wrote
            for call in group:
                call.error = error
                call.prepared.model.abandon_forward(call.prepared)
            return
        seconds = time.perf_counter() - start
        total = sum(sizes)
        for prepared, size in zip(passes, sizes):
            prepared.model.last_batch = (total - size, len(passes) - 1)
        if self.on_pass is not None:
            drafting = sum(1 for prepared, size in zip(passes, sizes) if size > 1 and not prepared.last_only)
            prompts = sum(1 for prepared in passes if prepared.last_only)
            self.on_pass(PassRecord(passes[0].joint_key, len(passes), total, drafting, prompts, seconds))


def lane_forward(lane, tokens: torch.Tensor, positions, tree_mask, last_only: bool, extend_tree: bool, reduce) -> torch.Tensor:
    """A lane's `forward` on either backend: with a joiner, through it (a prompt cut into chunks, its
    open chain then reopened whole, as one pass would leave it: a draft's search extends it); without
    one, its own pass. `lane` has prepare_forward, finish_forward, abandon_forward, reopen_chain."""
    if lane.joiner is not None:
        if last_only and positions is None and tree_mask is None and not extend_tree:  # a prompt's pass: in chunks
            start = lane.cache_len
            logits = prompt_in_chunks(lane, tokens, reduce)
            lane.reopen_chain(start)
            return logits
        return lane.joiner.forward(lane.prepare_forward(tokens, positions, tree_mask, last_only, extend_tree, reduce))
    prepared = lane.prepare_forward(tokens, positions, tree_mask, last_only, extend_tree, reduce)
    try:
        prepared.run_together([prepared])
    except BaseException:
        lane.abandon_forward(prepared)
        raise
    return lane.finish_forward(prepared)


def prompt_in_chunks(lane, tokens: torch.Tensor, reduce) -> torch.Tensor:
    """A lane's prompt pass as its joiner cuts it (JointPasses.prompt_chunk); a chunk that a joining
    request stopped left nothing in the cache and runs again, priced anew. `lane` is a backend's lane
    (prepare_forward, joiner)."""
    while True:
        piece = tokens[: lane.joiner.prompt_chunk(len(tokens))]
        last = len(piece) == len(tokens)
        prepared = lane.prepare_forward(piece, None, None, True, False, reduce if last else None)
        prepared.preemptible = not last  # a cut chunk; the last piece would run again at the same width
        try:
            logits = lane.joiner.forward(prepared)
        except PassPreempted:
            continue
        if last:
            return logits
        tokens = tokens[len(piece) :]

