#!/usr/bin/env -S MALLOC_ARENA_MAX=2 node --max-semi-space-size=1
// Entry point of the `yabusame` command; the TypeScript sources are compiled to dist/ by `npm run build`
// (npm ci runs it through the `prepare` script).
// --max-semi-space-size=1 (MiB): a small young generation keeps the daemons' scavenges short and
// their RSS low; measured with npm run bench (dest peak RSS 144 -> 125-135 MiB, no loss of
// speed). scripts/lib/daemons.ts passes the same flag when it starts the daemons.
import '../dist/daemon/cli.js';
