#!/usr/bin/env -S MALLOC_ARENA_MAX=2 node --max-semi-space-size=1 --heap-growing-percent=30
// Entry point of the `yabusame` command; the TypeScript sources are compiled to dist/ by `npm run build`
// (npm ci runs it through the `prepare` script).
// --max-semi-space-size=1 (MiB): a small young generation keeps the daemons' scavenges short and
// their RSS low; measured with npm run bench (dest peak RSS 144 -> 125-135 MiB, no loss of
// speed). --heap-growing-percent=30: V8 collects the old generation once it is 1.3 times what
// survived the last full collection, where its default lets a small heap grow to several times
// that first (many-vms dest peak RSS 147-148 -> 133 MiB, data-heavy 128-131 -> 117-119 MiB, no
// measured loss of speed). scripts/lib/daemons.ts passes the same flags when it starts the daemons.
import '../dist/daemon/cli.js';
