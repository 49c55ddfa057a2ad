// The dest unregisters every range before it tells the VMM `complete`, while the VMM's threads
// may be faulting on those ranges. uffd-race (scripts/uffd-race/uffd-race.c), another process,
// hands its userfaultfd over SCM_RIGHTS and keeps threads faulting on a fresh range while this
// process unregisters it with the daemon's own `uffd.unregister`. Once that returns, no thread may
// still be queued on the userfaultfd: nothing would wake it, and in a VMM it would be a vCPU hung
// for good. A bare UFFDIO_UNREGISTER leaves one now and then on this kernel; the comment the
// test prints says how often.
import t from 'tap';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { z } from 'zod';
import * as abi from '../../daemon/linux/abi.js';
import { ERRNO } from '../../daemon/linux/errors.js';
import * as sys from '../../daemon/linux/sys.js';
import * as uffd from '../../daemon/uffd/uffd.js';
import { buildCProgram } from '../../scripts/lib/build-c.js';

const ReportSchema = z.strictObject({
  iterations: z.number().int(),
  threads: z.number().int(),
  faultsServed: z.number().int(),
  strandedIterations: z.number().int(),
  strandedThreads: z.number().int(),
});
type Report = z.infer<typeof ReportSchema>;

async function receiveUffd(sock: number): Promise<number> {
  const buf = Buffer.alloc(1);
  for (let waited = 0; waited < 10_000; waited += 10) {
    const r = sys.tryRecvWithFds(sock, buf, 1, abi.MSG_DONTWAIT);
    if (typeof r !== 'number') {
      const [fd] = r.fds;
      if (fd === undefined) throw new Error(`uffd-race sent ${r.bytes} bytes without a descriptor`);
      return fd;
    }
    if (r !== -ERRNO.EAGAIN) throw new Error(`recvmsg: errno ${-r}`);
    await sleep(10);
  }
  throw new Error('uffd-race sent no userfaultfd within 10 s');
}

/** Runs uffd-race; each range it names is unregistered with `unregister`, then it hears "done". */
async function race(
  unregister: (fd: number, start: number, len: number) => void,
  args: string[],
): Promise<Report> {
  const binary = await buildCProgram('uffd-race');
  const [ours, theirs] = sys.socketpair();
  const child = spawn(binary, args, { stdio: ['pipe', 'pipe', 'pipe', theirs] });
  sys.close(theirs);
  const [stdin, stdout, stderrStream] = [child.stdin!, child.stdout!, child.stderr!];
  let stderr = '';
  stderrStream.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
  let fd = -1;
  try {
    fd = await receiveUffd(ours);
    let report: Report | undefined;
    for await (const line of createInterface({ input: stdout })) {
      const m = /^unregister (\d+) (\d+)$/.exec(line);
      if (m) {
        unregister(fd, Number(m[1]), Number(m[2]));
        stdin.write('done\n');
      } else {
        report = ReportSchema.parse(JSON.parse(line));
      }
    }
    const code = await exited;
    if (code !== 0 || !report) throw new Error(`uffd-race exited ${code}: ${stderr}`);
    return report;
  } finally {
    sys.close(ours);
    if (fd >= 0) sys.close(fd);
    child.kill();
  }
}

t.test('no thread stays blocked after the daemon unregisters a range it faults on', async (t) => {
  const r = await race(uffd.unregister, ['--iterations', '1500', '--threads', '4']);
  t.ok(
    r.faultsServed >= r.iterations,
    `the threads kept faulting: ${r.faultsServed} faults served over ${r.iterations} iterations`,
  );
  t.equal(r.strandedIterations, 0, 'after every unregister, every thread left the queue', {
    report: r,
  });
});

t.test('a bare UFFDIO_UNREGISTER, for comparison', async (t) => {
  const bare = (fd: number, start: number, len: number): void => {
    sys.tryUffdRange(fd, abi.UFFDIO_UNREGISTER, start, len);
  };
  // A short grace: a thread still queued 100 ms after the unregister counts as stranded (woken,
  // it leaves the queue within microseconds), and each one costs that wait.
  const r = await race(bare, ['--iterations', '600', '--threads', '4', '--grace-ms', '100']);
  t.ok(r.faultsServed >= r.iterations, `the threads kept faulting (${r.faultsServed} faults)`);
  t.comment(
    `a bare UFFDIO_UNREGISTER left a thread blocked in ${r.strandedIterations} of ${r.iterations} iterations (${r.strandedThreads} threads)`,
  );
});
