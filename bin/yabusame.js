#!/usr/bin/env node
// Entry point of the `yabusame` command; the TypeScript sources are compiled to dist/ by `npm run build`
// (npm ci runs it through the `prepare` script).
import '../dist/daemon/cli.js';
