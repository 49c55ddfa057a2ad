/**
 * The dest's bulk thread (background pages) runs at the nice value it is given (bulkThreadNice)
 * while the main thread keeps its own, and goes away with the daemon. Read from /proc: the
 * kernel's view, not the daemon's.
 */
import t from 'tap';
import { mkdtempSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startTestDest } from '../helpers/dest.js';

/** Nice value of every thread of this process, by thread id. */
function threadNices(): Map<number, number> {
  const out = new Map<number, number>();
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
      out.set(Number(tid), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]));
    } catch {
      // the thread ended while we looked
    }
  }
  return out;
}

async function waitFor(what: () => boolean, ms = 5000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (what()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return what();
}

t.test(
  'bulkNice 10: the bulk thread runs at nice 10 beside a main thread at 0, and stops with the daemon',
  async (t) => {
    const niced = (): number[] =>
      [...threadNices()].filter(([, n]) => n === 10).map(([tid]) => tid);
    t.same(niced(), [], 'no niced thread before the daemon');
    const dir = mkdtempSync(join(tmpdir(), 'yabusame-bulk-'));
    const dest = await startTestDest(join(dir, 'dest.sock'), { bulkNice: 10 });
    t.ok(await waitFor(() => niced().length === 1), `one thread at nice 10 (${niced().join(',')})`);
    t.equal(threadNices().get(process.pid), 0, 'the main thread keeps nice 0');
    await dest.close();
    t.ok(await waitFor(() => niced().length === 0), 'the bulk thread ended with the daemon');
  },
);
