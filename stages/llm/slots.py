"""Which llama.cpp slot serves a request: prompt keys and the prefix-aware choice.

A slot is one llama.cpp context (its own KV cache). llama-cpp-python reuses the longest
common token prefix between what a context holds and the next prompt, so a conversation's
next turn is cheap on the slot that served its previous turn (only the new messages are
prefilled) and expensive anywhere else (the whole history is). Measured on 2 cores, a
241-token next turn: TTFT 233 ms on its own slot (218 tokens cached), 1201 ms on a slot
that held only the same instructions (82 cached), 1875 ms cold: prompt evaluation of
SmolLM2 Q4_1 runs at only ~100-200 tokens/s here (``benchmarks/stages/llm.py``).

Why messages and not tokens: the exact measure would be the token prefix, but getting the
new prompt's tokens means rendering the chat template and tokenizing once more per request
(llama-cpp-python renders it again inside ``create_chat_completion``), with code that
mirrors its chat-handler selection. The chat template renders messages in order, each from
its own fields, so equal leading messages render to equal leading text: comparing each
slot's last prompt, message by message, ranks slots the same way at the cost of a few string
compares (Python compares equal strings with one ``memcmp``). Each key is weighted by its
length in characters, a stand-in for tokens that is good enough to rank slots.

The choice, for a request and each candidate slot:
1. Does it evict a live conversation? It does when the prompt departs from what the slot
   holds before the slot's last message: whole messages of another conversation would be
   overwritten, and that conversation pays its whole history again on its next turn,
   seconds later. A cold slot, which costs only the instructions once, is cheaper than
   that. Departing at the last held message is not an eviction: it is the same
   conversation revising it (the reply the client trimmed at barge-in; a speculative
   start whose user message the final transcript changed; a cancelled reply is not
   recorded, so the next turn extends its prompt). A slot unused for ``STALE_AFTER_S``
   holds no live conversation (a voice session speaks every few seconds): overwriting it
   evicts nobody.
2. Then the least ``prefill + destroyed`` characters: what this request must evaluate on
   that slot, plus what it overwrites there when that is still live (stale content is
   worth nothing, its shared instructions still count as prefill saved).
3. Then the slot used least recently.
Without a conversation id in the request this is a heuristic; its known miss: a new
conversation may take the slot of one whose only turn was cut at barge-in.
"""

from __future__ import annotations

import json

from stages.llm.types import LlmRequest

# Idle time after which a slot's content no longer counts as a live conversation's.
STALE_AFTER_S = 60.0

Keys = tuple[str, ...]


def prompt_keys(request: LlmRequest) -> Keys:
    """One string per rendered piece, in template order: the tools, then each message.

    The role comes first and the content last, as the template writes them, so the shared
    prefix of two differing keys approximates the shared prefix of their rendered text.
    """
    tools = ""
    if request.tools:
        tools = json.dumps([t.model_dump(exclude_none=True) for t in request.tools],
                           sort_keys=True)
    keys = [tools]
    for m in request.messages:
        calls = ""
        if m.tool_calls:
            calls = json.dumps([c.model_dump() for c in m.tool_calls], sort_keys=True)
        keys.append("\x1f".join((m.role, m.name or "", m.tool_call_id or "", calls,
                                 m.content or "")))
    return tuple(keys)


def reply_key(text: str) -> str:
    """The key of the assistant message a finished reply becomes in the next turn."""
    return "\x1f".join(("assistant", "", "", "", text))


def divergence(held: Keys, keys: Keys) -> tuple[int, int]:
    """(characters of ``keys`` that ``held`` already covers, index of the first key that
    differs, or the length of the shorter when one is a prefix of the other)."""
    shared = 0
    for i, (a, b) in enumerate(zip(held, keys, strict=False)):
        if a == b:
            shared += len(a)
            continue
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return shared + n, i
    return shared, min(len(held), len(keys))


def shared_prefix(held: Keys, keys: Keys) -> int:
    """Characters of ``keys`` that ``held`` already covers (whole keys, then a partial one)."""
    return divergence(held, keys)[0]


def rank(held: Keys, keys: Keys, live: bool) -> tuple[bool, int]:
    """Sort key of a slot holding ``held`` for a prompt with ``keys`` (lower is better):
    (evicts a live conversation, prefill + destroyed characters); see the module doc.
    ``live``: the slot was used recently enough for its content to belong to a live
    conversation."""
    shared, i = divergence(held, keys)
    evicts = live and i < len(held) - 1
    prefill = sum(map(len, keys)) - shared
    destroyed = sum(map(len, held)) - shared if live else 0
    return evicts, prefill + destroyed
