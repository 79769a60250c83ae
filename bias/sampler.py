"""Batched sampling on llama.cpp: many sequences per llama_decode, prompts decoded once.

A second llama.cpp context on a Runtime's loaded model, with a unified KV cache and up to
`n_seq` sequence ids. The prompts' common head (chat template, system prompt) is decoded
once into a root sequence and copied to every sequence id that starts a prompt (a copy
only tags cells). Each group (one prompt, several runs of it) decodes the rest of its
prompt once, every token tagged with all the group's sequence ids, so the K sampled runs
and the greedy one share its cells; then each llama_decode holds one row per live
sequence. When a sequence ends (an end-of-generation token or max_tokens) its cells are
removed and its id goes back to the pool; a waiting group is admitted as soon as enough
ids and cells are free (continuous batching; `refill=False` admits groups only into an
empty batch: waves). The cache is sized to what can be live at once, since attention
without flash attention spans every cell up to the highest in use.

Sampling is edge's one sampler (edge.sampling: llama.cpp's chain in numpy) on the returned
logits, each sequence with its own numpy Generator, so its draws do not depend on what else
shares the batch; with the same seed a run draws as `Runtime.stream` does. Answers are
still not always token-identical to `Runtime.stream`: llama.cpp's log-probs for one token
move with the batch layout (~0.05 nats between rows of a batch; up to ~0.2 nats measured
between a token decoded alone, as Runtime.stream decodes it, and one decoded among
others), so a near-tie can break the other way: 43 of 45 and 26 of 30 greedy answers on
two probe samples equalled Runtime.stream's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge import llamacpp
from edge.errors import ContextOverflowError, EdgeError
from edge.runtime import Runtime
from edge.sampling import Sampling, sample_rows

MAX_SEQ = 256  # LLAMA_MAX_SEQ
MAX_CELLS = 16384  # cap on the KV cache: attention spans the cells in use


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least its last token to decode."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return max(n, 0)


# ---- the batched generator -----------------------------------------------------------
@dataclass
class Group:
    """One prompt and its runs: a Generator each (None = greedy)."""

    prompt: Sequence[int]
    rngs: list[np.random.Generator | None]


@dataclass
class _Seq:
    sid: int
    group: int
    run: int
    rng: np.random.Generator | None
    pos: int
    unit: int
    tokens: list[int] = field(default_factory=list)


@dataclass
class SamplerStats:
    decodes: int = 0  # llama_decode calls
    prompt_tokens: int = 0  # prompt rows decoded: the common head once, each prompt's tail once
    gen_tokens: int = 0  # generated tokens fed back as rows
    answer_tokens: int = 0  # tokens in the answers (EOG not counted)
    shared_prefix: int = 0  # tokens at the head of every prompt of the last run, decoded once

    @property
    def tokens_decoded(self) -> int:
        return self.prompt_tokens + self.gen_tokens


class BatchSampler:
    """A second context on the Runtime's model for sampling many sequences at once."""

    def __init__(self, rt: Runtime, *, n_seq: int = 32, max_tokens: int = 24, max_prompt: int = 128,
                 prefix: int = 0, group_size: int = 1, n_batch: int = 256):
        """n_seq sequences at once; the cache is sized for prompts of up to max_prompt tokens
        whose first `prefix` tokens are common to all, and groups of group_size runs."""
        self.rt, self.max_tokens = rt, max_tokens
        n_seq = max(1, min(n_seq, MAX_SEQ - 1))  # one more id holds the common head
        self.group_size = max(1, min(group_size, n_seq))
        limit = min(rt.info.context_length or MAX_CELLS, MAX_CELLS)
        if max_prompt + max_tokens > limit:
            raise ContextOverflowError(
                f"a prompt of {max_prompt} tokens + {max_tokens} to generate exceeds the "
                f"{limit}-token context; shorten it or lower max_tokens")
        self.n_batch = max(n_batch, max_prompt + n_seq)
        self.ctx = self.batch = None
        self.stats = SamplerStats()
        try:
            while True:  # fewer sequences (a smaller cache) if llama.cpp cannot make the context
                # A group's runs share its prompt, and all prompts share their head: max_tokens
                # per sequence, the head once, and a tail per group, with room for twice the
                # groups that fit at once, so freed ids rarely wait for cells. Tight, because
                # attention spans every cell up to the highest in use.
                groups = max(1, n_seq // self.group_size)
                cells = n_seq * max_tokens + prefix + 2 * groups * (max_prompt - prefix)
                self.n_ctx = min(-(-cells // 256) * 256, limit)
                self._open(n_seq)
                if self.ctx or n_seq <= self.group_size:
                    break
                n_seq = max(self.group_size, n_seq // 2)
            if not self.ctx:
                raise EdgeError(f"llama.cpp could not create a {self.n_ctx}-cell sampling context; "
                                "free some memory or lower the number of sequences")
        except BaseException:
            self.close()
            raise
        self.n_seq, self.root = n_seq, n_seq
        self.n_vocab = rt.n_vocab

    def _open(self, n_seq: int) -> None:
        import llama_cpp

        # flash attention off, as the Runtime and the scorer; one cell stream, so a prompt
        # cell can belong to every run of it
        self.ctx = llamacpp.new_context(self.rt.model, n_ctx=self.n_ctx, n_batch=self.n_batch,
                                        n_seq=n_seq + 1, kv_unified=True, threads=self.rt.threads)
        if not self.ctx:
            return
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, n_seq + 1)
        info = self.rt.info  # a correction on the Runtime (--correction) applies here too
        self._cvec = llamacpp.set_control_vector(self.ctx, self.rt.control_vector, info.n_layers or 0,
                                                 info.n_embd or 0)

    def run(self, groups: Sequence[Group], s: Sampling, *, refill: bool = True,
            on_done: Callable[[int, int, list[int]], None] | None = None) -> list[list[list[int]]]:
        """Generated token ids per group, per run (EOG excluded); on_done(group, run, ids)
        as each sequence ends."""
        import llama_cpp

        # The prompts' common head (chat template, system prompt) is decoded once, into the
        # root sequence, and copied to each group's ids (a copy only tags the cells).
        n0 = common_prefix([g.prompt for g in groups]) if groups else 0
        units: deque[tuple[int, list[int]]] = deque()  # (group, runs), ≤ group_size runs each
        for g, grp in enumerate(groups):
            runs = list(range(len(grp.rngs)))
            for a in range(0, len(runs), self.group_size):
                units.append((g, runs[a : a + self.group_size]))
                n_p, n_r = len(grp.prompt), len(units[-1][1])
                if n_p + n_r * self.max_tokens > self.n_ctx or n_p + self.n_seq > self.n_batch:
                    raise ContextOverflowError(
                        f"prompt {g} has {n_p} tokens; this sampler was built for "
                        f"{self.n_ctx - n_r * self.max_tokens} at most (raise max_prompt)")
        out: list[list[list[int]]] = [[[] for _ in grp.rngs] for grp in groups]
        free = list(range(self.n_seq - 1, -1, -1))
        live: list[_Seq] = []
        held: dict[int, int] = {}  # unit → cells its prompt's tail holds until its last run ends
        left: dict[int, int] = {}  # unit → runs still live
        cells = n0  # reserved: the head, each live unit's tail, max_tokens per live sequence
        llama_cpp.llama_memory_clear(self.mem, True)
        if n0:
            self._decode([(t, i, [self.root], False) for i, t in enumerate(groups[0].prompt[:n0])])
            self.stats.prompt_tokens += n0
        self.stats.shared_prefix = n0
        key = 0
        while units or live:
            rows: list[tuple[int, int, list[int], bool]] = []  # token, pos, seq ids, logits
            owners: list[list[_Seq]] = []  # sequences sampling from each logits row
            while units and (refill or not live):
                g, runs = units[0]
                prompt = groups[g].prompt
                need = len(prompt) - n0 + len(runs) * self.max_tokens
                if len(runs) > len(free) or cells + need > self.n_ctx or \
                        len(rows) + len(prompt) - n0 + len(live) > self.n_batch:
                    break
                units.popleft()
                key += 1
                seqs = [_Seq(free.pop(), g, r, groups[g].rngs[r], len(prompt), key) for r in runs]
                ids = [q.sid for q in seqs]
                for q in seqs:
                    llama_cpp.llama_memory_seq_cp(self.mem, self.root, q.sid, -1, -1)
                rows += [(prompt[i], i, ids, i == len(prompt) - 1) for i in range(n0, len(prompt))]
                owners.append(seqs)
                held[key], left[key] = len(prompt) - n0, len(seqs)
                cells += need
                self.stats.prompt_tokens += len(prompt) - n0
            for q in live:
                rows.append((q.tokens[-1], q.pos, [q.sid], True))
                owners.append([q])
                q.pos += 1
            self.stats.gen_tokens += len(live)
            self._decode(rows)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(len(owners), self.n_vocab))
            # one logits row per owner list, in batch order: new prompts' last rows, then live rows
            seqs = [q for own in owners for q in own]
            row_of = [j for j, own in enumerate(owners) for _ in own]
            toks = sample_rows(logits[row_of], [q.tokens for q in seqs], [q.rng for q in seqs], s)
            live = []
            for q, t in zip(seqs, toks.tolist(), strict=True):
                eog = self.rt.is_eog(t)
                if not eog:
                    q.tokens.append(t)
                if eog or len(q.tokens) >= self.max_tokens:
                    cells -= self._finish(q, held, left, free)
                    out[q.group][q.run] = q.tokens
                    self.stats.answer_tokens += len(q.tokens)
                    if on_done:
                        on_done(q.group, q.run, q.tokens)
                else:
                    live.append(q)
        return out

    def _finish(self, q: _Seq, held: dict[int, int], left: dict[int, int], free: list[int]) -> int:
        """Drop a sequence's cells and free its id; the cells released from the reservation."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self.mem, q.sid, -1, -1)
        free.append(q.sid)
        key = q.unit
        left[key] -= 1
        if left[key]:
            return self.max_tokens
        del left[key]
        return self.max_tokens + held.pop(key)  # the last run of a prompt frees its tail too

    def _decode(self, rows: Sequence[tuple[int, int, list[int], bool]]) -> None:
        import llama_cpp

        bt = self.batch
        bt.n_tokens = len(rows)
        for i, (tok, pos, ids, want) in enumerate(rows):
            bt.token[i], bt.pos[i], bt.logits[i] = tok, pos, want
            bt.n_seq_id[i] = len(ids)
            for j, sid in enumerate(ids):
                bt.seq_id[i][j] = sid
        rc = llama_cpp.llama_decode(self.ctx, bt)
        if rc != 0:
            raise EdgeError(f"llama_decode failed (code {rc}) while sampling; use fewer sequences")
        self.stats.decodes += 1

    def close(self) -> None:
        import llama_cpp

        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        llamacpp.free_context(self.ctx)
        self.ctx = None

    def __enter__(self) -> BatchSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
