// Bundles entry.js and the pinned @openai/agents-realtime into one browser script
// (build/agents-realtime.js, an IIFE: a plain <script> tag loads it, no module loader).
// Run by build.sh after `npm ci`.
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const here = dirname(fileURLToPath(import.meta.url));
const sdk = JSON.parse(
  readFileSync(join(here, 'node_modules/@openai/agents-realtime/package.json'), 'utf8'),
);

await build({
  entryPoints: [join(here, 'entry.js')],
  outfile: join(here, 'build/agents-realtime.js'),
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: 'chrome120',
  sourcemap: false,
  minify: false,
  logLevel: 'warning',
  define: { __AGENTS_REALTIME_VERSION__: JSON.stringify(sdk.version) },
});
console.log(`built build/agents-realtime.js (@openai/agents-realtime ${sdk.version})`);
