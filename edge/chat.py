"""The interactive chat: a multi-turn session that never outgrows its context, and its REPL.

`ChatSession` holds the history and trims the oldest turns so that the prompt plus room
for an answer always fits n_ctx; llama-cpp-python reuses the KV cache for the unchanged
prefix, so a turn only evaluates what is new. `repl()` is the terminal front end.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edge import telemetry
from edge.errors import BadOptionError, ContextOverflowError, EdgeError
from edge.generation import GenerationStats, Generator, Message
from edge.paths import atomic_write
from edge.sampling import Sampling


@dataclass
class ChatStats:
    turns: int
    messages_in_history: int
    messages_trimmed: int
    context_used: int
    n_ctx: int
    last: GenerationStats | None


class ChatSession:
    def __init__(self, rt: Generator, *, system: str | None = None, max_tokens: int = 512,
                 sampling: Sampling | None = None) -> None:
        self.rt = rt
        self.system = system
        self.max_tokens = max_tokens
        self.sampling = sampling or Sampling()
        self.messages: list[Message] = []
        self.turns = 0
        self.trimmed = 0
        self.context_used = 0
        # Room always kept free for the answer: a quarter of the context, at most max_tokens.
        self.reserve = max(8, min(max_tokens, rt.n_ctx // 4))

    def _head(self) -> list[Message]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _fit(self, user: str) -> list[int]:
        """Tokens of history + `user`, dropping the oldest turns until an answer fits.

        Once trimming is needed it goes down to half the context, as llama.cpp's context
        shift does: the history prefix then stays unchanged for several turns, and the KV
        cache is reused instead of the whole history being evaluated again every turn.
        """
        limit = self.rt.n_ctx
        while True:
            tokens = self.rt.chat_tokens(self._head() + self.messages + [{"role": "user", "content": user}])
            if len(tokens) + self.reserve <= limit:
                return tokens
            if not self.messages:
                if len(tokens) + self.reserve <= self.rt.n_ctx:
                    return tokens
                raise ContextOverflowError(
                    f"that message is {len(tokens)} tokens; with room for an answer it cannot fit "
                    f"the {self.rt.n_ctx}-token context: shorten it or restart with a larger --ctx"
                )
            # Drop the oldest user turn and everything up to the next user turn.
            drop = 1
            while drop < len(self.messages) and self.messages[drop]["role"] != "user":
                drop += 1
            del self.messages[:drop]
            self.trimmed += drop
            limit = self.rt.n_ctx // 2 + self.reserve  # the prompt goes down to half the context

    def send(self, user: str) -> Iterator[str]:
        """Stream the answer to `user`; the (possibly partial) answer joins the history."""
        tokens = self._fit(user)
        budget = min(self.max_tokens, self.rt.n_ctx - len(tokens))
        self.messages.append({"role": "user", "content": user})
        previous = self.rt.last
        try:
            yield from self.rt.stream(tokens, max_tokens=budget, sampling=self.sampling)
        finally:
            last = self.rt.last
            if last is None or last is previous:  # stopped before generation began
                self.messages.pop()
            else:
                self.messages.append({"role": "assistant", "content": last.text})
                self.turns += 1
                self.context_used = len(tokens) + last.n_gen_tokens
                if last.n_gen_tokens:
                    telemetry.log("latency", telemetry.latency_metrics(last, "chat"), model=self.rt.info,
                                  config=self.rt.config_record(temp=self.sampling.temp))

    def reset(self) -> None:
        self.messages.clear()
        self.context_used = 0

    def stats(self) -> ChatStats:
        return ChatStats(self.turns, len(self.messages), self.trimmed, self.context_used,
                         self.rt.n_ctx, self.rt.last)

    def save(self, path: str | Path) -> Path:
        """Write the conversation: Markdown for .md, JSON (OpenAI messages) otherwise."""
        path = Path(path).expanduser()
        msgs = self._head() + self.messages
        if path.suffix.lower() in (".md", ".markdown"):
            body = "\n\n".join(f"**{m['role']}**: {m['content']}" for m in msgs) + "\n"
        else:
            body = json.dumps({"model": self.rt.info.path, "messages": msgs}, indent=2, ensure_ascii=False)
        try:
            with atomic_write(path, "w") as f:
                f.write(body)
        except OSError as e:
            raise BadOptionError(f"cannot write {path}: {e.strerror}") from None
        return path


HELP = """Commands:
  /help            this list
  /stats           speed of the last answer and context use
  /reset           forget the conversation (keeps the system prompt)
  /system TEXT     set a new system prompt (and reset)
  /save FILE       save the conversation (.md for Markdown, else JSON)
  /exit            leave (or Ctrl-D)
  \"\"\"             start and end a multi-line message
Ctrl-C stops an answer and keeps the session."""


def format_stats(s: ChatStats) -> str:
    lines = [f"turns {s.turns} · context {s.context_used}/{s.n_ctx} tokens "
             f"({100 * s.context_used / s.n_ctx:.0f}%) · {s.messages_trimmed} old messages trimmed"]
    if s.last is not None:
        g = s.last
        lines.append(f"last answer: {g.n_gen_tokens} tokens, {g.gen_tps:.1f} tok/s generation, "
                     f"{g.prompt_tps:.1f} tok/s prompt ({g.n_prompt_evaluated} new of "
                     f"{g.n_prompt_tokens}), first token {g.ttft_ms:.0f} ms, stop: {g.stop_reason}")
    return "\n".join(lines)


def repl(session: ChatSession, *, interactive: bool, out: IO[str] | None = None,
         read: Callable[[str], str] = input, banner: str = "") -> int:
    """Run the chat loop until /exit or end of input; return the exit code.

    Interactive: a '>>> ' prompt, readline editing, Ctrl-C stops the current answer.
    Piped (not a terminal): each input line is one turn, only answers are printed.
    """
    out = out or sys.stdout
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        out.write(banner + "\n")
    prompt = ">>> " if interactive else ""

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    while True:
        try:
            line = read(prompt)
        except EOFError:
            if interactive:
                say("")
            return 0
        except KeyboardInterrupt:
            say("\n(Ctrl-D or /exit to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text == '"""' and interactive:
            parts: list[str] = []
            try:
                while (more := read("... ")).strip() != '"""':
                    parts.append(more)
            except (EOFError, KeyboardInterrupt):
                say("")
                continue
            text = "\n".join(parts).strip()
            if not text:
                continue
        elif text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                return 0
            if cmd == "/help":
                say(HELP)
            elif cmd == "/reset":
                session.reset()
                say("(conversation cleared)")
            elif cmd == "/stats":
                say(format_stats(session.stats()))
            elif cmd == "/system":
                session.system = arg.strip() or None
                session.reset()
                say("(system prompt set, conversation cleared)")
            elif cmd == "/save":
                if not arg.strip():
                    say("usage: /save FILE")
                    continue
                try:
                    say(f"(saved to {session.save(arg.strip())})")
                except EdgeError as e:
                    say(f"Error: {e}")
            else:
                say(f"unknown command {cmd}; /help lists them")
            continue
        try:
            for piece in session.send(text):
                out.write(piece)
                out.flush()
            say("")
        except KeyboardInterrupt:
            say(" [stopped]")
        except EdgeError as e:
            say(f"Error: {e}")
        if interactive:
            say("")
