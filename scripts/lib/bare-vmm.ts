/**
 * A VMM with no vCPUs: maps guest RAM, registers it with a userfaultfd, hands it to the dest and
 * waits for `complete`. Measures the background stream alone (benchmarks, experiments).
 */
import * as sys from '../../daemon/linux/sys.js';
import * as abi from '../../daemon/linux/abi.js';
import * as uffd from '../../daemon/uffd/uffd.js';
import type { HandoffReply } from '../../protocol/handoff.js';
import { socketHandoff } from '../vm-sim/vm-sim.js';

export interface BareResult {
  elapsedMs: number;
  report: Extract<HandoffReply, { type: 'complete' }>;
}

export async function bareMigration(opts: {
  sizeBytes: number;
  migrationId: string;
  source: string;
  destSocket: string;
}): Promise<BareResult> {
  const base = sys.mmap(
    opts.sizeBytes,
    abi.PROT_READ | abi.PROT_WRITE,
    abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_NORESERVE,
  );
  const { fd } = uffd.create(0);
  try {
    uffd.registerMissing(fd, base, opts.sizeBytes);
    const t0 = performance.now();
    let session: { close(): void } | undefined;
    const report = await new Promise<Extract<HandoffReply, { type: 'complete' }>>(
      (resolve, reject) => {
        void Promise.resolve(
          socketHandoff(opts.destSocket)(
            {
              type: 'handoff',
              version: 1,
              migrationId: opts.migrationId,
              source: opts.source,
              regions: [
                { name: 'ram0', base, sizeBytes: opts.sizeBytes, offset: 0, pageSizeBytes: 4096 },
              ],
            },
            fd,
            {
              reply: (r) => {
                if (r.type === 'complete') resolve(r);
                else if (r.type === 'error') reject(new Error(`${r.code}: ${r.message}`));
              },
              closed: (err) => reject(err ?? new Error('handoff connection closed')),
            },
          ),
        ).then((s) => (session = s), reject);
      },
    );
    const elapsedMs = performance.now() - t0;
    session?.close();
    return { elapsedMs, report };
  } finally {
    sys.close(fd);
    sys.munmap(base, opts.sizeBytes);
  }
}
