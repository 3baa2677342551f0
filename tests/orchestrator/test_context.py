"""The context policy (orchestrator/context.py): which messages reach the LLM.

Policy tests count tokens with a simple deterministic ``count`` so the arithmetic is
visible; the estimate and the long conversation are checked against the real SmolLM2
tokenizer and chat template (the bundled GGUF, vocab only), and one test sends the fitted
prompt to the real engine at the n_ctx where the issue's conversation failed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Callable, Iterator

import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from pydantic import ValidationError

from orchestrator.context import (
    GENERATION_PROMPT_TOKENS,
    ContextOverflow,
    estimate_text_tokens,
    estimate_tokens,
    estimate_tools_tokens,
    fit_messages,
)
from orchestrator.protocol.session import RetentionRatioTruncation, SessionConfig, Truncation
from stages.llm.engine import LlamaCppLlm
from stages.llm.settings import bundled_model_path
from stages.llm.types import (
    ChatMessage,
    FunctionCall,
    FunctionSpec,
    LlmError,
    LlmRequest,
    ToolCall,
    ToolSpec,
)

SYSTEM = ChatMessage(role="system", content="You are a helpful voice assistant.")


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def call(call_id: str, name: str = "get_weather", args: str = '{"city": "Paris"}'
         ) -> ChatMessage:
    return ChatMessage(role="assistant", tool_calls=[
        ToolCall(id=call_id, function=FunctionCall(name=name, arguments=args))])


def result(call_id: str, output: str = '{"temp_c": 21}') -> ChatMessage:
    return ChatMessage(role="tool", content=output, tool_call_id=call_id)


def ten(_: ChatMessage) -> int:
    """Every message costs 10 tokens: budgets become message counts."""
    return 10


def window_for(history_tokens: int, *, max_output: int = 100) -> int:
    """The window that leaves exactly ``history_tokens`` after SYSTEM (10 with ``ten``)."""
    return max_output + 10 + GENERATION_PROMPT_TOKENS + history_tokens


def fit(messages: list[ChatMessage], history_tokens: int,
        truncation: Truncation | None = "auto",
        count: Callable[[ChatMessage], int] = ten) -> list[ChatMessage]:
    return fit_messages(messages, window_tokens=window_for(history_tokens),
                        max_output_tokens=100, truncation=truncation, count=count).messages


def contents(messages: list[ChatMessage]) -> list[str | None]:
    return [m.content if m.content is not None else m.tool_calls[0].id if m.tool_calls
            else None for m in messages]


def assert_tool_pairs_intact(messages: list[ChatMessage]) -> None:
    called = {c.id for m in messages for c in m.tool_calls or []}
    for m in messages:
        if m.role == "tool":
            assert m.tool_call_id in called, f"tool result {m.tool_call_id} without its call"


# ---- the policy ------------------------------------------------------------------------

def test_nothing_is_dropped_when_it_fits() -> None:
    messages = [SYSTEM, user("u1"), assistant("a1"), user("u2")]
    fitted = fit_messages(messages, window_tokens=window_for(30), max_output_tokens=100,
                          truncation="auto", count=ten)
    assert fitted.messages == messages
    assert fitted.dropped == 0
    assert fitted.tokens == 10 + 30 + GENERATION_PROMPT_TOKENS


def test_oldest_messages_go_first_and_the_newest_user_message_stays() -> None:
    messages = [SYSTEM, user("u1"), assistant("a1"), user("u2"), assistant("a2"), user("u3")]
    fitted = fit_messages(messages, window_tokens=window_for(30), max_output_tokens=100,
                          truncation="auto", count=ten)
    assert contents(fitted.messages) == [SYSTEM.content, "u2", "a2", "u3"]
    assert fitted.messages[0] is SYSTEM
    assert fitted.dropped == 2
    assert fitted.tokens == 10 + 30 + GENERATION_PROMPT_TOKENS
    # one token less: one more message goes, the instructions and u3 never do
    assert contents(fit(messages, 29)) == [SYSTEM.content, "a2", "u3"]
    assert contents(fit(messages, 10)) == [SYSTEM.content, "u3"]


def test_everything_after_the_newest_user_message_is_kept() -> None:
    # a tool round trip in progress: the reply must see the question, the call and the result
    messages = [SYSTEM, user("u1"), assistant("a1"), user("u2"), call("c1"), result("c1")]
    assert contents(fit(messages, 30)) == [SYSTEM.content, "u2", "c1", '{"temp_c": 21}']
    with pytest.raises(ContextOverflow):
        fit(messages, 29)


def test_a_tool_call_and_its_result_are_dropped_together() -> None:
    messages = [SYSTEM, user("u1"), call("c1"), result("c1"), assistant("a1"),
                user("u2"), assistant("a2"), user("u3")]
    # 5 messages of room would start the kept history at the tool result: it goes too
    kept = fit(messages, 50)
    assert contents(kept) == [SYSTEM.content, "a1", "u2", "a2", "u3"]
    assert_tool_pairs_intact(kept)
    # 6 messages of room keep the call with its result
    kept = fit(messages, 60)
    assert contents(kept) == [SYSTEM.content, "c1", '{"temp_c": 21}', "a1", "u2", "a2", "u3"]


def test_parallel_calls_and_late_results_are_never_split() -> None:
    # two calls, then both results; a result that arrives after the next user message
    messages = [SYSTEM, user("u1"), call("c1"), call("c2"), result("c1"), result("c2"),
                assistant("a1"), call("c3"), user("u2"), result("c3"), user("u3")]
    for room in range(40, 110, 10):
        kept = fit(messages, room)
        assert_tool_pairs_intact(kept)
        calls = [m for m in kept if m.tool_calls]
        # a kept call keeps its result
        results = {m.tool_call_id for m in kept if m.role == "tool"}
        assert all(c.tool_calls[0].id in results for c in calls if c.tool_calls)
    # c3's result comes after u2: u2 is kept only together with c3
    assert contents(fit(messages, 40)) == [SYSTEM.content, "c3", "u2", '{"temp_c": 21}', "u3"]
    assert contents(fit(messages, 30)) == [SYSTEM.content, "u3"]


def test_retention_ratio_cuts_deeper_than_auto() -> None:
    history: list[ChatMessage] = []
    for i in range(10):
        history += [user(f"u{i}"), assistant(f"a{i}")]
    history.append(user("last"))  # 21 messages: one over a budget of 20
    messages = [SYSTEM, *history]
    half = RetentionRatioTruncation(type="retention_ratio", retention_ratio=0.5)
    auto = fit_messages(messages, window_tokens=window_for(200), max_output_tokens=100,
                        truncation="auto", count=ten)
    cut = fit_messages(messages, window_tokens=window_for(200), max_output_tokens=100,
                       truncation=half, count=ten)
    assert auto.dropped == 1
    assert cut.dropped == 11  # down to half of the 200-token budget
    assert cut.tokens == 10 + 100 + GENERATION_PROMPT_TOKENS
    assert cut.messages[-1].content == "last"


def test_retention_ratio_keeps_the_prompt_prefix_for_several_turns() -> None:
    """The point of the ratio: after a cut the prompt grows again for a while with the same
    first messages (prefix cache hits) instead of shifting on every turn like auto. The
    history alone decides where the cut is, so no state is kept between calls."""
    half = RetentionRatioTruncation(type="retention_ratio", retention_ratio=0.5)

    def first_kept_turn(truncation: Truncation, turns: int) -> list[int]:
        history: list[ChatMessage] = []
        firsts: list[int] = []
        for i in range(turns):
            history.append(user(f"u{i}"))
            fitted = fit_messages([SYSTEM, *history], window_tokens=window_for(100),
                                  max_output_tokens=100, truncation=truncation, count=ten)
            assert fitted.tokens <= window_for(100) - 100
            assert fitted.messages[-1].content == f"u{i}"
            firsts.append(int(str(fitted.messages[1].content)[1:]))
            history.append(assistant(f"a{i}"))
        return firsts

    auto, cut = first_kept_turn("auto", 40), first_kept_turn(half, 40)
    assert cut == sorted(cut)  # the cut only moves forward
    changes_auto = sum(a != b for a, b in itertools.pairwise(auto))
    changes_cut = sum(a != b for a, b in itertools.pairwise(cut))
    assert changes_auto >= 30  # once the window is full, every turn shifts the prefix
    # 100 tokens hold 5 turns; a cut to 50 leaves room for 2-3 more turns before the next
    assert 5 <= changes_cut <= changes_auto / 2


def test_retention_token_limit_lowers_the_budget() -> None:
    messages = [SYSTEM, user("u1"), assistant("a1"), user("u2"), assistant("a2"), user("u3")]
    limited = RetentionRatioTruncation.model_validate(
        {"type": "retention_ratio", "retention_ratio": 1.0,
         "token_limits": {"post_instructions": 20}})
    assert contents(fit(messages, 1000, limited)) == [SYSTEM.content, "a2", "u3"]


def test_the_newest_user_message_survives_a_zero_ratio() -> None:
    messages = [SYSTEM, user("u1"), assistant("a1"), user("u2"), assistant("a2"), user("u3")]
    zero = RetentionRatioTruncation(type="retention_ratio", retention_ratio=0.0)
    assert contents(fit(messages, 40, zero)) == [SYSTEM.content, "u3"]


def test_disabled_raises_instead_of_trimming() -> None:
    messages = [SYSTEM, user("u1"), assistant("a1"), user("u2")]
    assert fit(messages, 30, "disabled") == messages
    with pytest.raises(ContextOverflow) as info:
        fit(messages, 29, "disabled")
    assert info.value.code == "context_length_exceeded"
    assert "truncation is disabled" in str(info.value)
    assert info.value.needed_tokens == 10 + 30 + GENERATION_PROMPT_TOKENS


def test_instructions_too_long_raise() -> None:
    long_system = ChatMessage(role="system", content="Be brief. " * 500)
    with pytest.raises(ContextOverflow) as info:
        fit_messages([long_system, user("Hi")], window_tokens=2048, max_output_tokens=256,
                     truncation="auto")
    assert info.value.code == "context_length_exceeded"
    assert info.value.limit_tokens == 2048 - 256
    assert info.value.needed_tokens > 2048 - 256
    assert "instructions" in str(info.value)


def test_a_newest_message_too_long_raises_even_with_room_for_history() -> None:
    messages = [SYSTEM, user("u1"), assistant("a1"), user("word " * 3000)]
    with pytest.raises(ContextOverflow):
        fit_messages(messages, window_tokens=2048, max_output_tokens=256, truncation="auto")


def test_a_reply_reserve_as_large_as_the_window_raises() -> None:
    with pytest.raises(ContextOverflow, match="leaves no room"):
        fit_messages([SYSTEM, user("Hi")], window_tokens=2048, max_output_tokens=4096,
                     truncation="auto")


def test_reserved_tokens_count_against_the_budget() -> None:
    messages = [SYSTEM, user("u1"), assistant("a1"), user("u2")]
    fitted = fit_messages(messages, window_tokens=window_for(30), max_output_tokens=100,
                          count=ten, reserved_tokens=10)
    assert contents(fitted.messages) == [SYSTEM.content, "a1", "u2"]


def test_fit_needs_the_instructions() -> None:
    with pytest.raises(ValueError):
        fit_messages([], window_tokens=2048, max_output_tokens=256, truncation="auto")


# ---- the session setting -----------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "auto",
    "disabled",
    {"type": "retention_ratio", "retention_ratio": 0.8},
    {"type": "retention_ratio", "retention_ratio": 0.5,
     "token_limits": {"post_instructions": 1000}},
])
def test_truncation_setting_round_trips(value: object) -> None:
    config = SessionConfig.model_validate({"truncation": value})
    assert config.model_dump(mode="json")["truncation"] == value


@pytest.mark.parametrize("value", [
    "sometimes",
    {"type": "retention_ratio"},
    {"type": "retention_ratio", "retention_ratio": 1.5},
    {"type": "retention_ratio", "retention_ratio": -0.1},
    {"type": "summarize"},
    {"type": "retention_ratio", "retention_ratio": 0.5, "keep": 3},
    {"type": "retention_ratio", "retention_ratio": 0.5, "token_limits": {"post_instructions": 0}},
    7,
])
def test_unknown_truncation_forms_are_rejected(value: object) -> None:
    with pytest.raises(ValidationError):
        SessionConfig.model_validate({"truncation": value})


def test_unset_truncation_means_auto() -> None:
    assert SessionConfig().truncation is None
    messages = [SYSTEM, user("u1"), assistant("a1"), user("u2")]
    assert fit(messages, 20, None) == fit(messages, 20, "auto")


# ---- against the real tokenizer ----------------------------------------------------------

@pytest.fixture(scope="module")
def vocab() -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(model_path=bundled_model_path(), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def real_text_tokens(vocab: llama_cpp.Llama, text: str) -> int:
    return len(vocab.tokenize(text.encode(), add_bos=False, special=False))


def rendered(message: ChatMessage) -> str:
    """One message as ChatML (SmolLM2's template), with tool calls and results in the
    Hermes form that tool-calling templates use (SmolLM2's own drops them: this is more)."""
    body = message.content or ""
    for c in message.tool_calls or []:
        try:
            args: object = json.loads(c.function.arguments)
        except ValueError:
            args = c.function.arguments
        body += ("<tool_call>\n" + json.dumps({"name": c.function.name, "arguments": args})
                 + "\n</tool_call>")
    if message.role == "tool":
        body = f"<tool_response>\n{body}\n</tool_response>"
    return f"<|im_start|>{message.role}\n{body}<|im_end|>\n"


def real_counter(vocab: llama_cpp.Llama) -> Callable[[ChatMessage], int]:
    cache: dict[str, int] = {}

    def count(message: ChatMessage) -> int:
        text = rendered(message)
        if text not in cache:
            cache[text] = len(vocab.tokenize(text.encode(), add_bos=False, special=True))
        return cache[text]

    return count


_formatters: dict[int, Jinja2ChatFormatter] = {}


def real_prompt_tokens(vocab: llama_cpp.Llama, messages: list[ChatMessage]) -> int:
    """Tokens of the prompt the engine builds: the GGUF's own chat template with the
    generation prompt, tokenized with BOS, as llama-cpp-python does."""
    formatter = _formatters.get(id(vocab))
    if formatter is None:
        formatter = _formatters[id(vocab)] = Jinja2ChatFormatter(
            template=vocab.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
            bos_token="<|im_start|>", add_generation_prompt=True)
    dicts = [{"role": m.role, "content": m.content or ""} for m in messages]
    prompt = formatter(messages=dicts).prompt  # type: ignore[arg-type]
    return len(vocab.tokenize(prompt.encode(), add_bos=True, special=True))


VARIED_TEXTS = [
    "Hi there! Could you tell me what the weather is like in Paris today?",
    "um so i was thinking that maybe we could uh go to the the store later",
    "Incomprehensibilities notwithstanding, internationalization is hard.",
    "Call 0123456789 or 555-867-5309 before 2024-12-31 at 23:59; it costs $1,299.99.",
    "def f(x: int) -> dict[str, list[int]]:\n    return {'a': [x**2, x//3]}",
    '{"city": "San Francisco", "units": "metric", "days": [1, 2, 3]}',
    "Wait... what?! No -- really?? (Yes.) [Maybe]; {never}: <always>",
    "NASA, IBM, McDonald's, O'Reilly, iPhone, eBay, GPT-4o, SmolLM2-135M-Instruct.",
    "Café, naïve, résumé, Zürich, São Paulo, Kraków, jalapeño, déjà vu.",
    "東京は日本の首都です。Москва — столица России. مرحبا بالعالم",
    "Great job! 🎉🎉 Let's go 🚀 see you soon 😊👍",
    "See https://example.com/path/to/page?query=value&other=123#anchor for details.",
    "xq zvbn wpfk qqqq zzzzz xkcd jklm vbnm asdf qwerty zxcvbnm",
    "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "aGVsbG8gd29ybGQgdGhpcyBpcyBhIGJhc2U2NCBzdHJpbmcgZm9yIHRlc3Rpbmc=",
    "ofekiwazupo bimula tegarosi wunefa kalibetro supinagu merotaki",
    "Die Donaudampfschifffahrtsgesellschaftskapitänsmütze liegt auf dem Tisch.",
    "a  b   c\n\n\n\td\t\te    f\n",
    "OK",
    "",
]


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_the_estimate_is_never_below_the_real_count(vocab: llama_cpp.Llama, text: str) -> None:
    assert estimate_text_tokens(text) >= real_text_tokens(vocab, text)
    count = real_counter(vocab)
    for message in (user(text), assistant(text), ChatMessage(role="system", content=text),
                    result("call_1", text), call("call_1", "lookup", json.dumps({"q": text}))):
        assert estimate_tokens(message) >= count(message), message


def test_plain_english_is_not_wildly_overestimated(vocab: llama_cpp.Llama) -> None:
    text = ("The quick brown fox jumps over the lazy dog. I'd like to book a flight from "
            "New York to Los Angeles on March third, returning the tenth, for two adults.")
    ratio = estimate_text_tokens(text) / real_text_tokens(vocab, text)
    assert 1.0 <= ratio <= 3.0


def test_tool_definitions_estimate(vocab: llama_cpp.Llama) -> None:
    tool = ToolSpec(function=FunctionSpec(
        name="get_weather", description="Current weather for a city",
        parameters={"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]}))
    as_json = json.dumps(tool.model_dump(exclude_none=True))
    assert estimate_tools_tokens([tool]) >= real_text_tokens(vocab, as_json) + 5
    assert estimate_tools_tokens(None) == 0


USER_LINES = [
    "What's the capital of France?",
    "um can you tell me uh a bit more about that",
    "How far is it from Berlin to Munich by train, and how long does it take?",
    "Set a timer for 25 minutes please.",
    "What did I ask you at the start of this conversation?",
    "Tell me a joke about programmers and coffee.",
    "My order number is 48213-A; when will it arrive?",
    "ok thanks",
    "Explain photosynthesis like I'm five, then like I'm a biology student, with the "
    "light reactions, the Calvin cycle and why plants look green to us.",
]
ASSISTANT_LINES = [
    "Paris is the capital of France.",
    "Sure! It has been the country's political and cultural center for centuries.",
    "By high-speed ICE train the trip takes about four hours; the distance is roughly "
    "585 kilometers.",
    "Done, your timer is set for 25 minutes.",
    "You first asked about the capital of France.",
    "Why do programmers prefer dark mode? Because light attracts bugs.",
    "Order 48213-A shipped yesterday and should arrive on Thursday between 9:00 and 17:00.",
    "You're welcome! Anything else?",
]


def conversation(turns: int, seed: int = 8) -> Iterator[list[ChatMessage]]:
    """A growing conversation: yields the history each time a user has just spoken."""
    rng = random.Random(seed)
    history: list[ChatMessage] = []
    for turn in range(turns):
        history.append(user(rng.choice(USER_LINES)))
        if turn % 10 == 5:  # a tool round trip inside the turn
            call_id = f"call_{turn}"
            history.append(call(call_id, "get_order", json.dumps({"order": f"{turn}-A"})))
            history.append(result(call_id, json.dumps({"status": "shipped", "eta": "Thu"})))
        yield list(history)
        history.append(assistant(" ".join(rng.sample(ASSISTANT_LINES, rng.randint(1, 3)))))


@pytest.mark.parametrize("truncation", [
    "auto", RetentionRatioTruncation(type="retention_ratio", retention_ratio=0.6)])
def test_a_200_turn_conversation_always_fits_the_real_window(
        vocab: llama_cpp.Llama, truncation: Truncation) -> None:
    window, max_output = 2048, 256
    real = real_counter(vocab)
    trimmed_turns = 0
    for history in conversation(200):
        for count in (real, estimate_tokens):
            fitted = fit_messages([SYSTEM, *history], window_tokens=window,
                                  max_output_tokens=max_output, truncation=truncation,
                                  count=count)
            assert real_prompt_tokens(vocab, fitted.messages) <= window - max_output
            assert fitted.tokens <= window - max_output
            newest_user = max(i for i, m in enumerate(history) if m.role == "user")
            assert fitted.messages[-(len(history) - newest_user):] == history[newest_user:]
            assert_tool_pairs_intact(fitted.messages)
        trimmed_turns += fitted.dropped > 0
    assert trimmed_turns > 100  # the conversation really outgrew the window
    for message in history:
        assert estimate_tokens(message) >= real(message), message
    # the estimate errs high but not absurdly: it keeps a useful amount of history
    kept = fit_messages([SYSTEM, *history], window_tokens=window, max_output_tokens=max_output,
                        truncation="auto")
    assert real_prompt_tokens(vocab, kept.messages) > (window - max_output) / 3


def test_the_engine_takes_the_fitted_prompt_of_a_long_conversation() -> None:
    """The issue's failure: at n_ctx 2048 the whole history is refused with
    context_length_exceeded; the fitted one is answered."""
    *_, history = conversation(120)
    messages = [SYSTEM, *history]
    llm = LlamaCppLlm(n_ctx=2048, n_threads=2, max_tokens=4)

    async def run() -> None:
        try:
            window = await llm.context_window()
            assert window == 2048
            with pytest.raises(LlmError) as info:
                async for _ in llm.stream(LlmRequest(messages=messages, max_tokens=4)):
                    pass
            assert info.value.code == "context_length_exceeded"
            # a large reply reserve keeps the prompt short: prompt evaluation is slow on CPU
            reserve = window - 200
            fitted = fit_messages(messages, window_tokens=window, max_output_tokens=reserve,
                                  truncation="auto")
            assert fitted.dropped > 0
            deltas = [d async for d in llm.stream(
                LlmRequest(messages=fitted.messages, max_tokens=4))]
            assert deltas[-1].finish_reason in ("stop", "length")
            assert deltas[-1].usage is not None
            assert deltas[-1].usage.prompt_tokens <= window - reserve
        finally:
            await llm.aclose()

    asyncio.run(run())
