#!/usr/bin/env bash
# Builds the browser bundle of the pinned OpenAI Agents SDK used by tests/browser
# (build/agents-realtime.js). Idempotent and quick when nothing changed: `npm ci` runs only
# when package-lock.json differs from what node_modules was installed from, and the bundle
# is rebuilt only when it is older than its inputs. Needs node + npm (registry access on the
# first run).
set -euo pipefail
cd "$(dirname "$0")"
command -v npm >/dev/null 2>&1 || { echo "build.sh: node and npm are needed" >&2; exit 1; }
stamp=node_modules/.cascade-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # --ignore-scripts: nothing from the registry runs at install; esbuild's API finds its
  # platform binary (@esbuild/<os>-<arch>) without its postinstall step.
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi
out=build/agents-realtime.js
if [ ! -f "$out" ] || [ -n "$(find entry.js build.mjs "$stamp" -newer "$out" 2>/dev/null)" ]; then
  node build.mjs
fi
