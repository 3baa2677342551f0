"""The profile report's call tree, from py-spy's collapsed stacks."""

from __future__ import annotations

from benchmarks.reliability.profile import frame_name, main_thread_tree, report

LOOP = ("thread: MainThread (7);_run_module_as_main (<frozen runpy>:198);"
        "BaseEventLoop._run_once (/py/asyncio/base_events.py:1922);"
        "Handle._run (/py/asyncio/events.py:80)")
RAW = "\n".join([
    f"{LOOP};_read_loop (/app/orchestrator/websocket.py:127);handle (/app/realtime.py:360) 60",
    f"{LOOP};_read_loop (/app/orchestrator/websocket.py:130) 20",
    f"{LOOP};ReplyRun._run (/app/orchestrator/reply.py:90) 15",
    "thread: MainThread (7);_run_module_as_main (<frozen runpy>:198);"
    "EpollSelector.select (/py/selectors.py:468) 5",
    "thread: vad-batch_0 (9);_worker (/py/concurrent/futures/thread.py:81) 100",
    "not a stack line",
])


def test_frame_names_lose_their_paths_and_lines() -> None:
    assert frame_name("Handle._run (/py/asyncio/events.py:80)") == "Handle._run (events.py)"
    assert frame_name("<module> (<frozen runpy>:198)") == "<module> (<frozen runpy>)"


def test_the_loop_tree_starts_at_what_the_loop_ran() -> None:
    threads, tree = main_thread_tree(RAW)
    assert threads == {"thread: MainThread": 100, "thread: vad-batch_0": 100}
    assert tree.samples == 100
    read = tree.children["_read_loop (websocket.py)"]
    assert read.samples == 80
    assert read.children["handle (realtime.py)"].samples == 60
    assert tree.children["ReplyRun._run (reply.py)"].samples == 15
    assert tree.children["(the loop itself)"].samples == 5


def test_the_report_cuts_the_tree_at_the_minimum_share() -> None:
    text = report("headline", RAW, min_percent=10.0)
    lines = text.splitlines()
    assert lines[0] == "headline"
    assert "   50.0% thread: MainThread" in lines
    assert " 80.0% _read_loop (websocket.py)" in lines
    assert "   60.0% handle (realtime.py)" in lines
    assert " 15.0% ReplyRun._run (reply.py)" in lines
    assert not any("the loop itself" in line for line in lines)  # 5 % < 10 %


UVLOOP = ("thread: MainThread (7);_run_module_as_main (<frozen runpy>:198);"
          "run (/app/stages/common/event_loop.py:59);Runner.run (/py/asyncio/runners.py:118)")


def test_under_uvloop_the_tree_starts_below_the_runner() -> None:
    """uvloop's C loop calls callbacks and task steps with no Python frame of its own."""
    raw = "\n".join([
        f"{UVLOOP};_read_loop (/app/orchestrator/websocket.py:127) 30",
        f"{UVLOOP};ReplyRun._run (/app/orchestrator/reply.py:90) 10",
        f"{UVLOOP} 60",  # in the loop's C code: polling, transports
    ])
    _threads, tree = main_thread_tree(raw)
    assert tree.children["_read_loop (websocket.py)"].samples == 30
    assert tree.children["ReplyRun._run (reply.py)"].samples == 10
    assert tree.children["(the loop itself)"].samples == 60
    assert set(tree.children) == {"_read_loop (websocket.py)", "ReplyRun._run (reply.py)",
                                  "(the loop itself)"}
