"""PNG plots of ``cascade bench``: written when there is data, skipped when not."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from matplotlib.colors import to_rgb
from PIL import Image

from benchmarks.v2v import plots
from benchmarks.v2v.records import TurnRecord
from tests.benchmarks.v2v.test_report import make_report, turn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        width, height = img.size
    assert 400 <= width <= 4000 and 300 <= height <= 4000, (width, height)


def test_all_plots_are_valid_pngs(tmp_path: Path) -> None:
    report = make_report()
    written = plots.write_plots(report, tmp_path)
    assert set(written) == {"latency_cdf.png", "concurrency.png", "waterfall.png"}
    assert plots.planned(report) == list(written)
    for path in written.values():
        assert path == tmp_path / path.name
        assert_png(path)


def test_no_sweep_no_concurrency_plot(tmp_path: Path) -> None:
    written = plots.write_plots(make_report(sweep=False), tmp_path)
    assert set(written) == {"latency_cdf.png", "waterfall.png"}
    assert not (tmp_path / "concurrency.png").exists()


def test_records_missing_marks(tmp_path: Path) -> None:
    partial = turn("streaming", None)  # speech_stopped and transcript only, no reply
    bare = TurnRecord(phase="compare", mode="serial", concurrency=1, session_index=0, round=0,
                      clip="lights", started_s=0.0, eos_s=1.0, error="connect failed")
    early = turn("streaming", 450.0, rnd=1).model_copy(
        update={"speech_stopped_ms": -80.0, "final_transcript_ms": None})
    written = plots.write_plots(make_report(records=[partial, bare, early]), tmp_path / "a")
    assert set(written) == {"latency_cdf.png", "waterfall.png"}
    for path in written.values():
        assert_png(path)
    # Nothing to draw at all: no plot, no crash.
    assert plots.write_plots(make_report(records=[bare]), tmp_path / "b") == {}
    assert plots.write_plots(make_report(records=[]), tmp_path / "c") == {}


def test_waterfall_caps_rows() -> None:
    records = [turn(m, 500.0, rnd=i) for m in ("streaming", "serial") for i in range(40)]
    fig = plots.waterfall(make_report(records=records))
    assert fig is not None
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == plots.WATERFALL_MAX_ROWS
    assert labels[0] == "streaming · lights · 0" and labels[-1] == "serial · lights · 11"


def test_plots_from_threads(tmp_path: Path) -> None:
    report = make_report()
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda i: plots.write_plots(report, tmp_path / str(i)),
                                range(3)))
    for written in results:
        assert len(written) == 3
        for path in written.values():
            assert_png(path)


def test_waterfall_shows_where_playback_ran_dry() -> None:
    smooth, stutter = turn("streaming", 500.0), turn("streaming", 600.0, rnd=1, gaps=1)
    stutter.gaps = [(1500.0, 120.0)]
    fig = plots.waterfall(make_report(records=[smooth, stutter], sweep=False))
    assert fig is not None
    ax = fig.axes[0]
    red = [p for p in ax.patches
           if tuple(round(c, 3) for c in to_rgb(p.get_facecolor())) == tuple(
               round(int(plots.GAP_COLOR[i:i + 2], 16) / 255, 3) for i in (1, 3, 5))]
    assert [(p.get_x(), p.get_width()) for p in red] == [(1500.0, 120.0)]  # type: ignore[attr-defined]
    box = ax.get_legend()
    assert box is not None
    legend = [t.get_text() for t in box.get_texts()]
    assert plots.GAP_LABEL in legend


def test_two_transports_are_separate_series(tmp_path: Path) -> None:
    from tests.benchmarks.v2v.test_report import _two_transports

    report = _two_transports()
    assert list(plots._cdf_data(report)) == ["streaming ws", "serial ws", "streaming webrtc",
                                             "serial webrtc"]
    rows = plots._waterfall_rows(report)
    assert {(r.mode, r.transport) for r in rows} == {
        ("streaming", "ws"), ("serial", "ws"), ("streaming", "webrtc"), ("serial", "webrtc")}
    for path in plots.write_plots(report, tmp_path).values():
        assert_png(path)
