"""The README's client example, run verbatim against a real ``cascade serve``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from orchestrator.launcher import serve_process
from stages.common.audio import read_wav, write_wav
from stages.common.text import wer
from tests.support.speech import piper_clip

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- readme-example: talk.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its client example"
    return match.group(1)


def test_readme_client_example_talks_to_the_server(tmp_path: Path) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 30
    question = "What is the capital of France?"
    write_wav(str(tmp_path / "question.wav"), piper_clip(question, 24_000), 24_000)
    with serve_process("--api-key", "sk-local") as url:
        port = url.rsplit(":", 1)[1]
        script = tmp_path / "talk.py"
        script.write_text(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=120,
                              capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    assert wer(question, lines["you"]) <= 0.2, proc.stdout
    assert lines["agent"].strip(), proc.stdout
    samples, rate = read_wav((tmp_path / "reply.wav").read_bytes())
    assert rate == 24_000 and samples.size > 12_000
