"""A strict checker for server events, built from OpenAI's published schema as the
``openai`` SDK ships it.

The SDK's pydantic models are lenient on purpose (unknown keys are kept as extras, a
missing optional field is just ``None``), so "the SDK parses it" proves little about the
shape on the wire. This checker reads the same models as a schema instead and walks the
JSON an event serializes to:

* a field without a default is required: it must be present; when its annotation is
  ``Optional[...]`` it is nullable-but-required (present, may be ``null``);
* a key the model does not define is an error;
* every value must have the JSON kind its annotation says (string, integer, number,
  boolean, array, object, one of a ``Literal``'s values), recursing into nested models,
  lists and dicts. Unions of models are resolved by their ``Literal`` fields (``type``,
  and ``role`` for the message items that all share ``type: "message"``).

The event class comes from the SDK's own server-event union (``RealtimeServerEvent``), by
the event's ``type``: GA from ``openai.types.realtime``, beta from
``openai.types.beta.realtime`` (the dialect cascade serves to ``OpenAI-Beta: realtime=v1``
clients).

The SDK (like the OpenAPI spec it is generated from) marks almost every field of a server
object optional, although OpenAI always sends many of them, as ``null`` when they do not
apply; a client that validates against the API reference's shapes needs them.
``always_sent()`` names those keys (from the API reference's event examples): the field a
content part's type is about (``{"type": "input_audio", "transcript": null}``),
``previous_item_id``, the response's ``status_details`` / ``usage`` / ``metadata``, the
error's ``code`` / ``param`` / ``event_id``. A missing one is reported like a missing
required key.

Besides that stricter table, two named departures from the SDK's models, and only these:

* ``EXTENSIONS``: cascade's documented extensions, the ``cascade.turn.timings`` event and
  the ``cascade`` key of a session object. Nothing else may be added.
* ``schema_overrides()``: where the SDK's model disagrees with OpenAI's published API
  reference about a server event. The GA SDK types ``session.created`` /
  ``session.updated``'s session as the *request* model, which has no ``id`` or ``object``;
  the API reference gives ``RealtimeSessionCreateResponse`` (``{ id, object, type, ...}``),
  which the SDK also ships, and OpenAI sends ``id`` and ``object``.
"""

from __future__ import annotations

import functools
import importlib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

Dialect = Literal["ga", "beta"]
JsonPath = str


@dataclass(frozen=True)
class Extensions:
    """cascade's own additions to the protocol, accepted by name."""

    event_types: frozenset[str] = frozenset({"cascade.turn.timings"})
    # Keys allowed beyond the schema, as "<event type>:<dotted path>".
    keys: frozenset[str] = field(
        default_factory=lambda: frozenset(
            {"session.created:session.cascade", "session.updated:session.cascade"}
        )
    )


EXTENSIONS = Extensions()


class SchemaViolation(AssertionError):
    """The event does not have the shape the schema describes."""

    def __init__(self, event_type: str, dialect: Dialect, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{dialect} {event_type}: {len(self.problems)} problem(s)\n  {lines}")


# ------------------------------------------------------------------------ SDK event tables


def _union_members(union: Any) -> list[Any]:
    """The members of a (possibly ``Annotated``) union, flattened."""
    if typing.get_origin(union) is typing.Annotated:
        return _union_members(typing.get_args(union)[0])
    if typing.get_origin(union) in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(union):
            out.extend(_union_members(arg))
        return out
    return [union]


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` (through ``Optional`` / ``Annotated``), else ()."""
    values: list[Any] = []
    for member in _union_members(annotation):
        if typing.get_origin(member) is Literal:
            values.extend(typing.get_args(member))
    return tuple(values)


def _by_type(union: Any) -> dict[str, type[BaseModel]]:
    table: dict[str, type[BaseModel]] = {}
    for member in _union_members(union):
        for value in _literal_values(member.model_fields["type"].annotation):
            assert value not in table, f"two SDK classes for {value!r}"
            table[value] = member
    return table


_PACKAGES: dict[Dialect, str] = {
    "ga": "openai.types.realtime",
    "beta": "openai.types.beta.realtime",
}


@functools.cache
def event_models(dialect: Dialect) -> dict[str, type[BaseModel]]:
    """Server event ``type`` -> the SDK class that describes it, from the SDK's union."""
    module = importlib.import_module(f"{_PACKAGES[dialect]}.realtime_server_event")
    return _by_type(module.RealtimeServerEvent)


def beta_available() -> bool:
    """Whether the installed SDK still ships the beta realtime types."""
    try:
        event_models("beta")
    except ImportError:
        return False
    return True


@functools.cache
def schema_overrides() -> dict[tuple[type[BaseModel], str], Any]:
    """(SDK class, field) -> the annotation to check instead; see the module docstring."""
    from openai.types.realtime.realtime_session_create_response import (
        RealtimeSessionCreateResponse,
    )

    ga = event_models("ga")
    return {
        (ga["session.created"], "session"): RealtimeSessionCreateResponse,
        (ga["session.updated"], "session"): RealtimeSessionCreateResponse,
    }


# (module under the dialect's types package, class) -> {tag: keys}; tag "*" = any value,
# otherwise the object's "type". See the module docstring.
_ALWAYS_SENT_SPEC: dict[Dialect, dict[tuple[str, str], dict[str, frozenset[str]]]] = {
    "ga": {
        ("realtime_conversation_item_user_message", "Content"): {
            "input_text": frozenset({"text"}),
            "input_audio": frozenset({"transcript"}),
        },
        ("realtime_conversation_item_system_message", "Content"): {
            "input_text": frozenset({"text"}),
        },
        ("realtime_conversation_item_assistant_message", "Content"): {
            "output_text": frozenset({"text"}),
            "output_audio": frozenset({"transcript"}),
        },
        ("response_content_part_added_event", "Part"): {
            "text": frozenset({"text"}),
            "audio": frozenset({"transcript"}),
        },
        ("response_content_part_done_event", "Part"): {
            "text": frozenset({"text"}),
            "audio": frozenset({"transcript"}),
        },
        ("conversation_item_added", "ConversationItemAdded"): {
            "*": frozenset({"previous_item_id"}),
        },
        ("conversation_item_done", "ConversationItemDone"): {
            "*": frozenset({"previous_item_id"}),
        },
        ("conversation_item_created_event", "ConversationItemCreatedEvent"): {
            "*": frozenset({"previous_item_id"}),
        },
        ("input_audio_buffer_committed_event", "InputAudioBufferCommittedEvent"): {
            "*": frozenset({"previous_item_id"}),
        },
        ("realtime_response", "RealtimeResponse"): {
            "*": frozenset({"id", "object", "status", "status_details", "output", "usage",
                            "metadata"}),
        },
        ("realtime_error", "RealtimeError"): {
            "*": frozenset({"code", "param", "event_id"}),
        },
    },
    "beta": {
        ("conversation_item_content", "ConversationItemContent"): {
            "input_text": frozenset({"text"}),
            "input_audio": frozenset({"transcript"}),
            "text": frozenset({"text"}),
            "audio": frozenset({"transcript"}),
        },
        ("response_content_part_added_event", "Part"): {
            "text": frozenset({"text"}),
            "audio": frozenset({"transcript"}),
        },
        ("response_content_part_done_event", "Part"): {
            "text": frozenset({"text"}),
            "audio": frozenset({"transcript"}),
        },
        ("conversation_item_created_event", "ConversationItemCreatedEvent"): {
            "*": frozenset({"previous_item_id"}),
        },
        ("input_audio_buffer_committed_event", "InputAudioBufferCommittedEvent"): {
            "*": frozenset({"previous_item_id"}),
        },
        ("realtime_response", "RealtimeResponse"): {
            "*": frozenset({"id", "object", "status", "status_details", "output", "usage",
                            "metadata"}),
        },
        ("error_event", "Error"): {
            "*": frozenset({"code", "param", "event_id"}),
        },
    },
}


@functools.cache
def always_sent(dialect: Dialect) -> dict[type[BaseModel], dict[str, frozenset[str]]]:
    """SDK class -> {tag: keys OpenAI always sends}, for ``dialect``."""
    package = _PACKAGES[dialect]
    table: dict[type[BaseModel], dict[str, frozenset[str]]] = {}
    for (module, name), keys in _ALWAYS_SENT_SPEC[dialect].items():
        cls = getattr(importlib.import_module(f"{package}.{module}"), name)
        assert issubclass(cls, BaseModel), (module, name)
        for key in (k for ks in keys.values() for k in ks):
            assert key in cls.model_fields, f"{module}.{name} has no field {key!r}"
        table[cls] = keys
    return table


# ------------------------------------------------------------------------ the walk


class _Walk:
    def __init__(self, event_type: str, dialect: Dialect, extensions: Extensions) -> None:
        self.event_type = event_type
        self.dialect = dialect
        self.extensions = extensions
        self.problems: list[str] = []

    def fail(self, path: JsonPath, message: str) -> None:
        self.problems.append(f"{path or '<event>'}: {message}")

    def allowed_extra(self, path: JsonPath) -> bool:
        return f"{self.event_type}:{path}" in self.extensions.keys

    def value(self, annotation: Any, value: Any, path: JsonPath) -> None:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            self.value(typing.get_args(annotation)[0], value, path)
        elif origin in (typing.Union, types.UnionType):
            self.union(annotation, value, path)
        elif origin is Literal:
            allowed = typing.get_args(annotation)
            if not any(value == a and type(value) is type(a) for a in allowed):
                self.fail(path, f"{value!r} is not one of {list(allowed)}")
        elif origin in (list, Sequence) or annotation is list:
            if not isinstance(value, list):
                self.fail(path, f"expected an array, got {_kind(value)}")
                return
            (inner,) = typing.get_args(annotation) or (Any,)
            for i, v in enumerate(value):
                self.value(inner, v, f"{path}[{i}]")
        elif origin in (dict, Mapping) or annotation is dict:
            if not isinstance(value, dict):
                self.fail(path, f"expected an object, got {_kind(value)}")
                return
            args = typing.get_args(annotation)
            inner = args[1] if len(args) == 2 else Any
            for k, v in value.items():
                self.value(inner, v, f"{path}.{k}")
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            self.model(annotation, value, path)
        else:
            self.scalar(annotation, value, path)

    def scalar(self, annotation: Any, value: Any, path: JsonPath) -> None:
        if annotation is Any or annotation is object:
            return  # any JSON value
        if annotation is type(None):
            ok = value is None
        elif annotation is str:
            ok = isinstance(value, str)
        elif annotation is bool:
            ok = isinstance(value, bool)
        elif annotation is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif annotation is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            raise TypeError(f"{path}: the checker does not know the annotation {annotation!r}")
        if not ok:
            shown = "" if value is None else f" {value!r:.60}"
            self.fail(path, f"expected {_name(annotation)}, got {_kind(value)}{shown}")

    def union(self, annotation: Any, value: Any, path: JsonPath) -> None:
        members = _union_members(annotation)
        if value is None:
            if type(None) not in members:
                self.fail(path, "null is not allowed here")
            return
        members = [m for m in members if m is not type(None)]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if isinstance(value, dict) and models:
            candidates = [m for m in models if _tags_match(m, value)]
            if not candidates:
                self.fail(path, f"matches no member of {[m.__name__ for m in models]} "
                          f"by its tags ({_tags(value)})")
                return
            members = candidates
        attempts: list[list[str]] = []
        for member in members:
            trial = _Walk(self.event_type, self.dialect, self.extensions)
            trial.value(member, value, path)
            if not trial.problems:
                return
            attempts.append(trial.problems)
        fewest: list[str] = min(attempts, key=len)
        self.problems.extend(fewest)

    def model(self, cls: type[BaseModel], value: Any, path: JsonPath) -> None:
        if not isinstance(value, dict):
            self.fail(path, f"expected an object ({cls.__name__}), got {_kind(value)}")
            return
        overrides = schema_overrides()
        known: set[str] = set()
        for name, info in cls.model_fields.items():
            key = info.alias or name
            known.add(key)
            where = f"{path}.{key}" if path else key
            if key not in value:
                if info.is_required():
                    nullable = type(None) in _union_members(info.annotation)
                    self.fail(where, "required key is missing"
                              + (" (nullable: send null)" if nullable else ""))
                continue
            self.value(overrides.get((cls, name), info.annotation), value[key], where)
        sent = always_sent(self.dialect).get(cls, {})
        tag = value.get("type")
        expected = sent.get("*", frozenset()) | sent.get(str(tag), frozenset())
        for key in sorted(expected - value.keys()):
            where = f"{path}.{key}" if path else key
            self.fail(where, "missing; OpenAI always sends this key (null when it does not apply)")
        for key in sorted(value.keys() - known):
            where = f"{path}.{key}" if path else key
            if not self.allowed_extra(where):
                self.fail(where, f"unknown key (not in {cls.__name__})")


def _tags(value: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={value[k]!r}" for k in ("type", "role") if k in value)


def _tags_match(cls: type[BaseModel], value: Mapping[str, Any]) -> bool:
    """Whether every ``Literal`` field of ``cls`` that tags it (required, or present in the
    value) agrees with ``value``."""
    for name, info in cls.model_fields.items():
        literal = _literal_values(info.annotation)
        if not literal:
            continue
        key = info.alias or name
        if key in value:
            if value[key] not in literal:
                return False
        elif info.is_required():
            return False
    return True


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _name(annotation: Any) -> str:
    return {str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        annotation, repr(annotation)
    )


# ------------------------------------------------------------------------ public API


def violations(
    event: Mapping[str, Any], dialect: Dialect = "ga", extensions: Extensions = EXTENSIONS
) -> list[str]:
    """Every way ``event`` (the parsed JSON of one server event) departs from the schema;
    empty when it conforms."""
    event_type = event.get("type")
    if not isinstance(event_type, str):
        return [f"type: expected a string, got {event_type!r}"]
    if event_type in extensions.event_types:
        walk = _Walk(event_type, dialect, extensions)
        walk.scalar(str, event.get("event_id"), "event_id")
        return walk.problems
    models = event_models(dialect)
    if event_type not in models:
        return [f"type: {event_type!r} is not a {dialect} server event"]
    walk = _Walk(event_type, dialect, extensions)
    walk.model(models[event_type], dict(event), "")
    return walk.problems


def check_event(
    event: Mapping[str, Any], dialect: Dialect = "ga", extensions: Extensions = EXTENSIONS
) -> None:
    """Raise ``SchemaViolation`` listing every problem when ``event`` does not conform."""
    problems = violations(event, dialect, extensions)
    if problems:
        raise SchemaViolation(str(event.get("type")), dialect, problems)


def model_violations(
    cls: type[BaseModel], value: Any, dialect: Dialect = "ga", extensions: Extensions = EXTENSIONS
) -> list[str]:
    """The same strict walk for any pydantic model read as a schema (``violations`` is this
    for the SDK class of the event's ``type``)."""
    walk = _Walk("", dialect, extensions)
    walk.model(cls, value, "")
    return walk.problems
