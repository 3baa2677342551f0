"""The store's behaviour, run once per backend (memory and a real redis-server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator.store import (
    ROOT,
    InvalidItem,
    InvalidResumeToken,
    ItemExists,
    ItemNotFound,
    LeaseKeeper,
    LeaseLost,
    SessionBusy,
    SessionNotFound,
    SessionStore,
    StoreClosed,
    StoreLimitError,
)
from tests.orchestrator.store.conftest import StoreFactory, raw_state

CONFIG = {"instructions": "Be brief.", "voice": "joe", "turn_detection": {"type": "server_vad"}}


def msg(item_id: str, text: str = "hi") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]}


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


async def test_create_and_resume_round_trip(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, token = await store.create_session(CONFIG)
    assert sid.startswith("sess_") and len(token) >= 40
    await store.append_item(sid, msg("item_a", "hello"))
    await store.append_item(sid, msg("item_b", "héllo ✓"))
    await store.set_turn_state(sid, {"response_id": "resp_1", "phase": "speaking"})
    snap = await store.resume(sid, token)
    assert snap.session_id == sid
    assert snap.config == CONFIG
    assert snap.items == [msg("item_a", "hello"), msg("item_b", "héllo ✓")]
    assert snap.turn_state == {"response_id": "resp_1", "phase": "speaking"}
    other_sid, other_token = await store.create_session({})
    assert other_sid != sid and other_token != token
    assert (await store.resume(other_sid, other_token)).items == []


async def test_resume_refuses_wrong_token_and_unknown_session(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, token = await store.create_session(CONFIG)
    other_sid, other_token = await store.create_session(CONFIG)
    with pytest.raises(InvalidResumeToken):
        await store.resume(sid, other_token)  # a real token, of another session
    with pytest.raises(InvalidResumeToken):
        await store.resume(sid, token[:-1] + ("A" if token[-1] != "A" else "B"))
    with pytest.raises(InvalidResumeToken):
        await store.resume(sid, "")
    with pytest.raises(SessionNotFound):
        await store.resume("sess_" + "0" * 24, token)
    for malformed in ("", "sess}{x", "a" * 65, "sess x"):
        with pytest.raises(SessionNotFound):
            await store.resume(malformed, token)
    assert (await store.resume(sid, token)).session_id == sid
    assert (await store.resume(other_sid, other_token)).session_id == other_sid


async def test_ordering_with_previous_item_id(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, _ = await store.create_session(CONFIG)
    assert await store.append_item(sid, msg("a")) == 0
    assert await store.append_item(sid, msg("b")) == 1
    assert await store.append_item(sid, msg("c"), previous_item_id="a") == 1
    assert await store.append_item(sid, msg("first"), previous_item_id=ROOT) == 0
    assert await store.append_item(sid, msg("d"), previous_item_id="b") == 4
    assert await store.append_item(sid, msg("e")) == 5
    assert ids(await store.list_items(sid)) == ["first", "a", "c", "b", "d", "e"]
    with pytest.raises(ItemNotFound):
        await store.append_item(sid, msg("x"), previous_item_id="nope")
    with pytest.raises(ItemExists):
        await store.append_item(sid, msg("c"))
    assert ids(await store.list_items(sid)) == ["first", "a", "c", "b", "d", "e"]


async def test_update_get_delete_items(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, token = await store.create_session(CONFIG)
    for name in ("a", "b", "c"):
        await store.append_item(sid, msg(name, f"text {name}"))
    truncated = {"id": "b", "type": "message", "role": "assistant", "status": "incomplete",
                 "content": [{"type": "output_audio", "transcript": "text"}]}
    await store.update_item(sid, "b", truncated)
    assert await store.get_item(sid, "b") == truncated
    body_without_id = {k: v for k, v in truncated.items() if k != "id"}
    await store.update_item(sid, "c", body_without_id)  # id filled in from the argument
    assert (await store.get_item(sid, "c"))["id"] == "c"
    with pytest.raises(InvalidItem):
        await store.update_item(sid, "a", msg("z"))  # body id differs
    with pytest.raises(ItemNotFound):
        await store.update_item(sid, "missing", msg("missing"))
    await store.delete_item(sid, "a")
    with pytest.raises(ItemNotFound):
        await store.delete_item(sid, "a")
    with pytest.raises(ItemNotFound):
        await store.get_item(sid, "a")
    assert ids(await store.list_items(sid)) == ["b", "c"]
    # a deleted id's slot is gone: inserting after it fails, re-adding it appends
    with pytest.raises(ItemNotFound):
        await store.append_item(sid, msg("y"), previous_item_id="a")
    assert await store.append_item(sid, msg("a")) == 2
    assert (await store.resume(sid, token)).items[0] == truncated


async def test_returned_and_passed_values_are_copies(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, _ = await store.create_session(CONFIG)
    item = msg("a", "original")
    await store.append_item(sid, item)
    item["content"][0]["text"] = "mutated by caller"
    got = await store.get_item(sid, "a")
    assert got["content"][0]["text"] == "original"
    got["content"][0]["text"] = "mutated again"
    assert (await store.list_items(sid))[0]["content"][0]["text"] == "original"


async def test_pydantic_models_are_stored_as_json(make_store: StoreFactory) -> None:
    class Part(BaseModel):
        type: str
        text: str

    class Item(BaseModel):
        id: str
        type: str = "message"
        content: list[Part]

    store = await make_store()
    sid, _ = await store.create_session(CONFIG)
    await store.append_item(sid, Item(id="m1", content=[Part(type="input_text", text="x")]))
    assert await store.get_item(sid, "m1") == {
        "id": "m1", "type": "message", "content": [{"type": "input_text", "text": "x"}]}


async def test_invalid_items_get_clear_errors(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, _ = await store.create_session(CONFIG)
    bad: list[Any] = [{"type": "message"}, {"id": 7}, {"id": ""}, {"id": ROOT},
                      {"id": "x", "v": object()}, {"id": "x", "v": float("nan")},
                      ["id", "x"], "item"]
    for item in bad:
        with pytest.raises(InvalidItem):
            await store.append_item(sid, item)
    with pytest.raises(InvalidItem):
        await store.update_config(sid, {"bad": {1, 2}})
    assert await store.list_items(sid) == []
    assert await store.get_config(sid) == CONFIG


async def test_limits_refuse_without_changing_state(make_store: StoreFactory) -> None:
    store = await make_store(max_items=3, max_item_bytes=200, max_config_bytes=100,
                             max_turn_state_bytes=100)
    sid, _ = await store.create_session({"k": "v"})
    for name in ("a", "b", "c"):
        await store.append_item(sid, msg(name))
    with pytest.raises(StoreLimitError, match="limit"):
        await store.append_item(sid, msg("d"))
    with pytest.raises(StoreLimitError):
        await store.append_item(sid, msg("e"), previous_item_id=ROOT)
    await store.delete_item(sid, "b")
    assert await store.append_item(sid, msg("d")) == 2  # room again after a delete
    assert ids(await store.list_items(sid)) == ["a", "c", "d"]
    with pytest.raises(StoreLimitError, match="bytes"):
        await store.update_item(sid, "a", msg("a", "x" * 300))
    assert await store.get_item(sid, "a") == msg("a")
    with pytest.raises(StoreLimitError):
        await store.update_config(sid, {"instructions": "y" * 200})
    with pytest.raises(StoreLimitError):
        await store.create_session({"instructions": "y" * 200})
    with pytest.raises(StoreLimitError):
        await store.set_turn_state(sid, {"s": "z" * 200})
    assert await store.get_config(sid) == {"k": "v"}
    assert await store.get_turn_state(sid) is None


async def test_config_and_turn_state(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, token = await store.create_session(CONFIG)
    assert await store.get_turn_state(sid) is None
    await store.update_config(sid, {**CONFIG, "voice": "other"})
    await store.set_turn_state(sid, {"phase": "listening", "revision": 3})
    await store.set_turn_state(sid, {"phase": "thinking", "revision": 4})
    assert await store.get_config(sid) == {**CONFIG, "voice": "other"}
    assert await store.get_turn_state(sid) == {"phase": "thinking", "revision": 4}
    snap = await store.resume(sid, token)
    assert snap.config["voice"] == "other" and snap.turn_state == {"phase": "thinking",
                                                                    "revision": 4}


async def test_delete_session(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, token = await store.create_session(CONFIG, owner="conn-1")
    await store.append_item(sid, msg("a"))
    assert await store.delete_session(sid) is True
    assert await store.delete_session(sid) is False
    with pytest.raises(SessionNotFound):
        await store.resume(sid, token)
    for call in (store.list_items(sid), store.append_item(sid, msg("b")),
                 store.get_turn_state(sid), store.touch(sid), store.get_config(sid)):
        with pytest.raises(SessionNotFound):
            await call


async def test_idle_ttl_expiry_and_refresh(make_store: StoreFactory) -> None:
    store = await make_store(session_ttl_s=3.0)
    sid, token = await store.create_session(CONFIG)
    idle_sid, idle_token = await store.create_session(CONFIG)
    await store.append_item(sid, msg("a"))
    await asyncio.sleep(1.8)
    await store.touch(sid)
    await asyncio.sleep(1.8)  # 3.6 s since creation, 1.8 s since the touch
    await store.append_item(sid, msg("b"))  # a write refreshes the TTL as well
    with pytest.raises(SessionNotFound):
        await store.resume(idle_sid, idle_token)
    await asyncio.sleep(1.8)
    assert ids((await store.resume(sid, token)).items) == ["a", "b"]
    await asyncio.sleep(3.6)
    with pytest.raises(SessionNotFound):
        await store.resume(sid, token)
    with pytest.raises(SessionNotFound):
        await store.list_items(sid)


async def test_lease_busy_takeover_release(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, token = await store.create_session(CONFIG, owner="conn-1")
    assert await store.lease_owner(sid) == "conn-1"
    with pytest.raises(SessionBusy):
        await store.resume(sid, token, owner="conn-2")
    with pytest.raises(SessionBusy):
        await store.resume(sid, token)
    with pytest.raises(SessionBusy):
        await store.acquire_lease(sid, "conn-2")
    # the holder itself may resume (a reconnect racing its own old socket)
    await store.resume(sid, token, owner="conn-1")
    await store.acquire_lease(sid, "conn-1")
    # a wrong token never reaches the lease check, and never takes over
    with pytest.raises(InvalidResumeToken):
        await store.resume(sid, "not-the-token", owner="conn-2", takeover=True)
    assert await store.lease_owner(sid) == "conn-1"
    snap = await store.resume(sid, token, owner="conn-2", takeover=True)
    assert snap.session_id == sid
    assert await store.lease_owner(sid) == "conn-2"
    with pytest.raises(LeaseLost):
        await store.renew_lease(sid, "conn-1")
    await store.release_lease(sid, "conn-1")  # not ours: a no-op
    assert await store.lease_owner(sid) == "conn-2"
    await store.renew_lease(sid, "conn-2")
    await store.release_lease(sid, "conn-2")
    assert await store.lease_owner(sid) is None
    await store.resume(sid, token)  # free again
    await store.acquire_lease(sid, "conn-3")
    with pytest.raises(ValueError):
        await store.acquire_lease(sid, "")


async def test_lease_expires_when_the_owner_stops_renewing(make_store: StoreFactory) -> None:
    store = await make_store(lease_ttl_s=2.0)
    sid, token = await store.create_session(CONFIG, owner="conn-1")
    for _ in range(5):  # renewing keeps it for well past one lease TTL
        await asyncio.sleep(0.6)
        await store.renew_lease(sid, "conn-1")
    with pytest.raises(SessionBusy):
        await store.resume(sid, token, owner="conn-2")
    await asyncio.sleep(2.6)  # the owner "died": no renewals
    assert await store.lease_owner(sid) is None
    await store.resume(sid, token, owner="conn-2")
    assert await store.lease_owner(sid) == "conn-2"
    with pytest.raises(LeaseLost):
        await store.renew_lease(sid, "conn-1")


async def test_lease_keeper_renews_then_releases(make_store: StoreFactory) -> None:
    store = await make_store(lease_ttl_s=1.0)
    sid, token = await store.create_session(CONFIG, owner="conn-1")
    async with LeaseKeeper(store, sid, "conn-1", 1.0) as keeper:
        await asyncio.sleep(2.0)
        with pytest.raises(SessionBusy):
            await store.resume(sid, token, owner="conn-2")
        assert not keeper.lost.is_set()
    assert await store.lease_owner(sid) is None
    keeper = LeaseKeeper(store, sid, "conn-2", 1.0)
    await store.resume(sid, token, owner="conn-2")
    async with keeper:
        await store.resume(sid, token, owner="conn-3", takeover=True)
        await asyncio.wait_for(keeper.lost.wait(), timeout=5.0)
    assert await store.lease_owner(sid) == "conn-3"  # the loser did not release it


async def test_concurrent_appends_lose_nothing(make_store: StoreFactory) -> None:
    first = await make_store()
    second = await make_store()
    sid, _ = await first.create_session(CONFIG)

    async def writer(store: Any, name: str) -> None:
        for i in range(40):
            await store.append_item(sid, msg(f"{name}{i:02d}"))

    await asyncio.gather(writer(first, "a"), writer(second, "b"), writer(first, "c"))
    got = ids(await second.list_items(sid))
    assert len(got) == 120 and len(set(got)) == 120
    for name in "abc":  # each writer's own order is kept
        assert [i for i in got if i[0] == name] == [f"{name}{i:02d}" for i in range(40)]


async def test_closed_store_refuses_calls(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, token = await store.create_session(CONFIG)
    await store.aclose()
    with pytest.raises(StoreClosed):
        await store.resume(sid, token)
    with pytest.raises(StoreClosed):
        await store.append_item(sid, msg("a"))
    with pytest.raises(StoreClosed):
        await store.create_session(CONFIG)


async def test_session_byte_bound_counts_updates_and_deletes(make_store: StoreFactory) -> None:
    def size(item: dict[str, Any]) -> int:
        return len(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode())

    big = [msg(f"i{n}", "é" * 60) for n in range(4)]  # multi-byte text: bytes, not chars
    store = await make_store(max_session_bytes=3 * size(big[0]) + 10)
    sid, _ = await store.create_session(CONFIG)
    for item in big[:3]:
        await store.append_item(sid, item)
    with pytest.raises(StoreLimitError, match="bytes"):
        await store.append_item(sid, big[3])
    with pytest.raises(StoreLimitError, match="bytes"):  # growing an item counts too
        await store.update_item(sid, "i0", msg("i0", "é" * 70))
    await store.update_item(sid, "i0", msg("i0", "short"))  # shrinking frees room
    await store.append_item(sid, msg("small", "é" * 10))
    with pytest.raises(StoreLimitError):
        await store.append_item(sid, big[3])
    await store.delete_item(sid, "i1")
    await store.append_item(sid, big[3])
    assert ids(await store.list_items(sid)) == ["i0", "i2", "small", "i3"]


# -- fencing: a write with owner= applies only while that owner holds the lease ----------

def fenced_writes(store: SessionStore, sid: str,
                  owner: str) -> dict[str, Callable[[], Awaitable[object]]]:
    """One call of every write method (and of each append mode), all by ``owner``, each of
    which would change the session if it were applied. The session has items a and b."""
    return {
        "update_config": lambda: store.update_config(sid, {"voice": "stolen"}, owner=owner),
        "append_item": lambda: store.append_item(sid, msg("stolen"), owner=owner),
        "append_item root": lambda: store.append_item(sid, msg("stolen"),
                                                      previous_item_id=ROOT, owner=owner),
        "append_item after": lambda: store.append_item(sid, msg("stolen"),
                                                       previous_item_id="a", owner=owner),
        "update_item": lambda: store.update_item(sid, "a", msg("a", "stolen"), owner=owner),
        "delete_item": lambda: store.delete_item(sid, "b", owner=owner),
        "set_turn_state": lambda: store.set_turn_state(sid, {"phase": "stolen"}, owner=owner),
        "touch": lambda: store.touch(sid, owner=owner),
        "delete_session": lambda: store.delete_session(sid, owner=owner),
        # the fence comes before the checks on stored state: no ItemNotFound / ItemExists
        "update_item missing": lambda: store.update_item(sid, "nope", msg("nope"),
                                                         owner=owner),
        "delete_item missing": lambda: store.delete_item(sid, "nope", owner=owner),
        "append_item existing": lambda: store.append_item(sid, msg("a"), owner=owner),
    }


async def assert_every_write_refused(store: SessionStore, sid: str, owner: str) -> None:
    """Each fenced write raises LeaseLost and leaves the stored session exactly as it was
    (items, config, turn state, lease and TTLs)."""
    before = await raw_state(store, sid)
    assert before is not None
    for name, write in fenced_writes(store, sid, owner).items():
        with pytest.raises(LeaseLost) as refused:
            await write()
        assert refused.value.code == "lease_lost", name
        assert await raw_state(store, sid) == before, f"{name} changed the session"


async def seeded(store: SessionStore, owner: str | None) -> tuple[str, str]:
    sid, token = await store.create_session(CONFIG, owner=owner)
    for name in "ab":
        await store.append_item(sid, msg(name), owner=owner)
    await store.set_turn_state(sid, {"phase": "speaking"}, owner=owner)
    return sid, token


async def test_fenced_writes_by_the_lease_holder_apply(make_store: StoreFactory) -> None:
    store = await make_store()
    sid, token = await seeded(store, owner="conn-1")
    assert await store.append_item(sid, msg("first"), previous_item_id=ROOT,
                                   owner="conn-1") == 0
    assert await store.append_item(sid, msg("c"), previous_item_id="a", owner="conn-1") == 2
    await store.update_item(sid, "a", msg("a", "edited"), owner="conn-1")
    await store.delete_item(sid, "b", owner="conn-1")
    await store.update_config(sid, {**CONFIG, "voice": "other"}, owner="conn-1")
    await store.set_turn_state(sid, {"phase": "listening"}, owner="conn-1")
    await store.touch(sid, owner="conn-1")
    # the holder gets the usual errors, and its refused writes change nothing either
    with pytest.raises(ItemNotFound):
        await store.update_item(sid, "missing", msg("missing"), owner="conn-1")
    with pytest.raises(ItemExists):
        await store.append_item(sid, msg("a"), owner="conn-1")
    snap = await store.resume(sid, token, owner="conn-1")
    assert snap.items == [msg("first"), msg("a", "edited"), msg("c")]
    assert snap.config == {**CONFIG, "voice": "other"}
    assert snap.turn_state == {"phase": "listening"}
    assert await store.lease_owner(sid) == "conn-1"
    # owner=None stays unfenced whoever holds the lease (tests, tools)
    await store.append_item(sid, msg("d"))
    await store.set_turn_state(sid, {"phase": "tool"})
    assert ids(await store.list_items(sid)) == ["first", "a", "c", "d"]
    assert await store.delete_session(sid, owner="conn-1") is True
    assert await store.delete_session(sid, owner="conn-1") is False


async def test_a_taken_over_owner_can_write_nothing(make_store: StoreFactory) -> None:
    old = await make_store()  # two stores on one state: two processes
    new = await make_store()
    sid, token = await seeded(old, owner="conn-1")
    await new.resume(sid, token, owner="conn-2", takeover=True)
    await assert_every_write_refused(old, sid, "conn-1")
    await assert_every_write_refused(new, sid, "conn-1")
    assert await new.lease_owner(sid) == "conn-2"
    snap = await new.resume(sid, token, owner="conn-2")
    assert snap.items == [msg("a"), msg("b")] and snap.config == CONFIG
    assert snap.turn_state == {"phase": "speaking"}
    # the new owner writes as usual
    assert await new.append_item(sid, msg("c"), owner="conn-2") == 2
    await new.update_item(sid, "a", msg("a", "mine"), owner="conn-2")
    await new.set_turn_state(sid, {"phase": "listening"}, owner="conn-2")
    assert ids(await old.list_items(sid)) == ["a", "b", "c"]
    # taking it back makes the old owner the writer again, and refuses the other
    await old.acquire_lease(sid, "conn-1", takeover=True)
    await old.delete_item(sid, "c", owner="conn-1")
    with pytest.raises(LeaseLost):
        await new.append_item(sid, msg("d"), owner="conn-2")
    assert ids(await new.list_items(sid)) == ["a", "b"]


async def test_a_lapsed_lease_refuses_fenced_writes(make_store: StoreFactory) -> None:
    store = await make_store(lease_ttl_s=0.5)
    sid, _ = await seeded(store, owner="conn-1")
    await asyncio.sleep(0.9)  # the owner stopped renewing: the lease expired
    assert await store.lease_owner(sid) is None
    await assert_every_write_refused(store, sid, "conn-1")
    await store.append_item(sid, msg("c"))  # unfenced still works
    await store.acquire_lease(sid, "conn-1")  # taken again, by anyone: writes again
    assert await store.append_item(sid, msg("d"), owner="conn-1") == 3


async def test_released_or_never_taken_lease_refuses_fenced_writes(
        make_store: StoreFactory) -> None:
    store = await make_store()
    sid, _ = await seeded(store, owner="conn-1")
    await store.release_lease(sid, "conn-1")
    assert await store.lease_owner(sid) is None
    await assert_every_write_refused(store, sid, "conn-1")
    unleased, _ = await seeded(store, owner=None)
    await assert_every_write_refused(store, unleased, "conn-1")
    # an empty owner is a programming error, never "unfenced"
    await store.acquire_lease(unleased, "conn-1")
    before = await raw_state(store, unleased)
    for write in (store.append_item(unleased, msg("x"), owner=""),
                  store.set_turn_state(unleased, {"phase": "x"}, owner=""),
                  store.touch(unleased, owner="")):
        with pytest.raises(ValueError):
            await write
    assert await raw_state(store, unleased) == before
