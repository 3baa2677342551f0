"""What of a conversation is sent to the LLM: the instructions and the newest messages that
fit the model's context window, so a long conversation never fails a reply.

The conversation items the client sees never change; only the prompt is trimmed.

The policy (OpenAI Realtime's session ``truncation``):

* ``"auto"`` (the default): when the prompt would not fit, the oldest messages after the
  instructions are left out, as few as needed.
* ``{"type": "retention_ratio", "retention_ratio": r}``: when the prompt would not fit, the
  oldest messages are left out until the rest uses at most ``r`` of the post-instruction
  budget. Following turns then grow into the freed room instead of trimming again on every
  turn, so the prompt's prefix stays the same for several turns (prefix/KV caching).
  ``token_limits.post_instructions`` lowers the post-instruction budget itself.
* ``"disabled"``: never trim; a prompt that does not fit is a ``ContextOverflow`` error.

The post-instruction budget is ``window - max_output_tokens`` minus the instructions
(system message), the caller's ``reserved_tokens`` (tool definitions) and the generation
prompt. The instructions and the newest user message (with everything after it) are always
kept; when even they do not fit, ``ContextOverflow``. Cuts only fall between whole tool
exchanges: an assistant tool call and its results are kept or dropped together, and no
tool result is left without its call.

Stateless retention. A server that trims with a retention ratio remembers where it cut and
keeps that cut until the budget is exceeded again. ``fit_messages`` gets the same answer
from the history alone: it replays the policy as if it had been applied after every
message as the conversation grew. The cut therefore only moves forward, and only when the
budget is exceeded; it needs no stored state and survives a session resume. With
``"auto"`` the replay gives exactly the smallest cut that fits (the ratio is 1).

Messages left out may be summarized into the prompt in a future version; for now they are
dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator.protocol.session import RetentionRatioTruncation, Truncation
from stages.llm.types import ChatMessage, ToolSpec

# Tokens a chat template adds around one message: ``<|im_start|>role\n ... <|im_end|>\n``
# is 5 with ChatML (SmolLM2, Qwen), Llama 3's header and ``<|eot_id|>`` also 5; 8 leaves
# room for templates with longer role markers.
MESSAGE_OVERHEAD_TOKENS = 8
# Around one tool call (Hermes-style ``<tool_call>\n{"name": ..., "arguments": ...}
# \n</tool_call>`` with its JSON keys) or one tool result (``<tool_response>`` tags).
TOOL_CALL_OVERHEAD_TOKENS = 16
# The generation prompt after the last message (``<|im_start|>assistant\n``: 3 with ChatML)
# and a BOS token, once per prompt.
GENERATION_PROMPT_TOKENS = 8

# Pieces that BPE tokenizers never merge across: runs of ASCII letters, single digits
# (SmolLM2 and Llama 3 split numbers into digits or short groups), whitespace runs, and
# single other characters.
_PIECES = re.compile(r"[A-Za-z]+|\d|\s+|[^A-Za-z\d\s]")
_VOWELS = frozenset("aeiouyAEIOUY")


class ContextOverflow(Exception):
    """The prompt cannot fit the model's context window under the session's truncation
    setting. ``code`` is the error code a client sees (OpenAI's name for it)."""

    code = "context_length_exceeded"

    def __init__(self, message: str, *, needed_tokens: int, limit_tokens: int) -> None:
        super().__init__(message)
        self.needed_tokens = needed_tokens
        self.limit_tokens = limit_tokens


@dataclass(frozen=True)
class Fitted:
    """The messages to send (instructions first), how many history messages were left out
    (the oldest ones), and the estimated prompt tokens (including the generation prompt and
    ``reserved_tokens``)."""

    messages: list[ChatMessage]
    dropped: int
    tokens: int


def estimate_text_tokens(text: str) -> int:
    """Tokens of ``text`` for a byte-level BPE tokenizer, erring high.

    The text is cut where BPE never merges, and each piece costs at least what it can take:

    * a run of n ASCII letters: ceil(n/2) for a lower-case or Capitalized word (real words
      are mostly 1-2 tokens; invented ones split into pieces of 2+ letters), ceil(2n/3) for
      ALL-CAPS or mixedCase runs (base64, acronyms), n when it has no vowel ("xkcd", "zvbn":
      BPE has few merges for such letters);
    * a digit or an ASCII symbol: 1; a non-ASCII character: its UTF-8 bytes (byte-level BPE
      never needs more than one token per byte);
    * whitespace: nothing for the single space before a word (it is part of the word's
      token), else 1 per newline or tab and 1 for any spaces.

    Measured against the SmolLM2-135M tokenizer (``Llama.tokenize``, vocab only, on the
    bundled GGUF; tests/orchestrator/test_context.py re-checks these kinds of text):

    ======================================================  ======  ========  ==========
    text                                                    pieces  real/est  worst one
    ======================================================  ======  ========  ==========
    Python stdlib docs (pydoc), README, issue: paragraphs   1,320   0.49      0.92
    the same, one sentence each                             7,317   0.48      1.00
    chat and ASR turns, names, JSON, code, URLs, numbers,     35    0.64      1.00
    accents, CJK/Cyrillic/Arabic, emoji, hex, UUIDs,
    base64, invented words, consonant strings, French,
    Spanish, German compounds, a traceback, a table
    ======================================================  ======  ========  ==========

    So the estimate was at or above the real count for every text tried, about 2x for
    plain English. That is deliberate: an estimate that runs low fails the reply, one that
    runs high only leaves an old turn out early. The worst cases (1.00) are one-token texts
    and digit strings, which ``estimate_tokens``'s per-message margin covers.
    """
    total = 0
    pieces = _PIECES.findall(text)
    for i, piece in enumerate(pieces):
        first = piece[0]
        if first.isascii() and first.isalpha():
            total += _letters_tokens(piece)
        elif piece.isspace():
            if piece == " ":
                following = pieces[i + 1][0] if i + 1 < len(pieces) else ""
                total += 0 if following.isascii() and following.isalpha() else 1
            else:
                total += (sum(len(c.encode("utf-8")) for c in piece if c != " ")
                          + (1 if " " in piece else 0))
        elif first.isascii():
            total += 1
        else:
            total += len(first.encode("utf-8"))
    return total


def _letters_tokens(run: str) -> int:
    n = len(run)
    if n > 1 and _VOWELS.isdisjoint(run):
        return n
    if run.islower() or (run[0].isupper() and run[1:].islower()):
        return math.ceil(n / 2)
    return math.ceil(2 * n / 3)


def estimate_tokens(message: ChatMessage) -> int:
    """Conservative tokens of one message in a chat prompt: its text, its tool calls
    (name and JSON arguments), and the template's per-message and per-call markers."""
    total = MESSAGE_OVERHEAD_TOKENS + estimate_text_tokens(message.content or "")
    if message.name:
        total += estimate_text_tokens(message.name)
    if message.tool_call_id:
        total += TOOL_CALL_OVERHEAD_TOKENS + estimate_text_tokens(message.tool_call_id)
    for call in message.tool_calls or []:
        total += (TOOL_CALL_OVERHEAD_TOKENS + estimate_text_tokens(call.id)
                  + estimate_text_tokens(call.function.name)
                  + estimate_text_tokens(call.function.arguments))
    return total


def estimate_tools_tokens(tools: Sequence[ToolSpec] | None) -> int:
    """Conservative tokens of tool definitions in the prompt (templates render them as JSON
    inside the system turn): pass it to ``fit_messages`` as ``reserved_tokens``."""
    if not tools:
        return 0
    total = MESSAGE_OVERHEAD_TOKENS
    for tool in tools:
        text = json.dumps(tool.model_dump(exclude_none=True), separators=(", ", ": "))
        total += TOOL_CALL_OVERHEAD_TOKENS + estimate_text_tokens(text)
    return total


def fit_messages(
    messages: list[ChatMessage],
    *,
    window_tokens: int,
    max_output_tokens: int,
    truncation: Truncation | None = "auto",
    count: Callable[[ChatMessage], int] = estimate_tokens,
    reserved_tokens: int = 0,
) -> Fitted:
    """The instructions (``messages[0]``) and the newest history messages (the rest, oldest
    first) that leave ``max_output_tokens`` of ``window_tokens`` for the reply.

    ``truncation`` is the session's setting (None = ``"auto"``); ``count`` measures one
    message (the conservative estimate by default; tests pass a real tokenizer);
    ``reserved_tokens`` is what else the prompt carries, e.g. ``estimate_tools_tokens``.
    Raises ``ContextOverflow`` when the instructions and the newest user message do not
    fit, or when trimming would be needed and truncation is ``"disabled"``.
    """
    if not messages:
        raise ValueError("fit_messages needs at least the instructions message")
    instructions, history = messages[0], messages[1:]
    input_limit = window_tokens - max_output_tokens
    if input_limit <= 0:
        raise ContextOverflow(
            f"max_output_tokens ({max_output_tokens}) leaves no room for the prompt in the "
            f"model's context window of {window_tokens} tokens",
            needed_tokens=max_output_tokens, limit_tokens=window_tokens)
    fixed = count(instructions) + reserved_tokens + GENERATION_PROMPT_TOKENS
    costs = [count(m) for m in history]
    suffix = [0] * (len(history) + 1)  # suffix[c]: tokens of history[c:]
    for i in range(len(history) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + costs[i]
    budget = input_limit - fixed
    if isinstance(truncation, RetentionRatioTruncation):
        limits = truncation.token_limits
        if limits is not None and limits.post_instructions is not None:
            budget = min(budget, limits.post_instructions)
    if suffix[0] <= budget:
        return Fitted(messages=list(messages), dropped=0, tokens=fixed + suffix[0])

    limit_text = (f"{input_limit} input tokens (a context window of {window_tokens} minus "
                  f"{max_output_tokens} for the reply)")
    if truncation == "disabled":
        raise ContextOverflow(
            f"the conversation needs about {fixed + suffix[0]} tokens but the model takes "
            f"{limit_text}, and the session's truncation is disabled",
            needed_tokens=fixed + suffix[0], limit_tokens=input_limit)
    ratio = truncation.retention_ratio if isinstance(truncation, RetentionRatioTruncation) else 1.0

    valid = _valid_cuts(history)
    cut = 0
    keep_from = 0  # the protected tail of the history so far starts here
    last_user = -1
    for end in range(1, len(history) + 1):  # replay: a request after every message
        if history[end - 1].role == "user":
            last_user = end - 1
        newest = last_user if last_user >= 0 else end - 1
        while keep_from < newest and valid[keep_from + 1] <= newest:
            keep_from = valid[keep_from + 1]
        if suffix[cut] - suffix[end] <= budget:
            continue
        # Over budget: cut forward to the first whole-exchange boundary that brings the
        # prompt down to the ratio's target, but never past the protected tail.
        target = math.floor(budget * ratio)
        while cut < keep_from and suffix[cut] - suffix[end] > target:
            cut = valid[cut + 1]

    needed = fixed + suffix[cut]
    if suffix[cut] > budget:
        raise ContextOverflow(
            f"the instructions and the newest message need about {needed} tokens but the "
            f"model takes {limit_text}; shorten the instructions or the message",
            needed_tokens=needed, limit_tokens=input_limit)
    return Fitted(messages=[instructions, *history[cut:]], dropped=cut, tokens=needed)


def _valid_cuts(history: list[ChatMessage]) -> list[int]:
    """``valid[i]``: the first index >= i where the history may be cut, i.e. where keeping
    ``history[c:]`` leaves no tool result whose call is in ``history[:c]`` (so a call and its
    results stay together). ``valid[len]`` is ``len`` (everything dropped)."""
    n = len(history)
    call_at: dict[str, int] = {}
    for i, msg in enumerate(history):
        for call in msg.tool_calls or []:
            call_at.setdefault(call.id, i)
    # earliest[c]: the smallest call index among tool results at or after c
    earliest = [n] * (n + 1)
    for j in range(n - 1, -1, -1):
        earliest[j] = earliest[j + 1]
        msg = history[j]
        if msg.role == "tool" and msg.tool_call_id is not None:
            k = call_at.get(msg.tool_call_id)
            if k is not None and k < j:
                earliest[j] = min(earliest[j], k)
    valid = [n] * (n + 1)
    for c in range(n - 1, -1, -1):
        ok = earliest[c] >= c and not _orphan_result(history, c, call_at)
        valid[c] = c if ok else valid[c + 1]
    return valid


def _orphan_result(history: list[ChatMessage], c: int, call_at: dict[str, int]) -> bool:
    """True when the kept history would start with a tool result whose call is not kept."""
    msg = history[c]
    if msg.role != "tool":
        return False
    k = call_at.get(msg.tool_call_id or "")
    return k is None or k < c
