/**
 * A start gate for vm-sim processes (--start-gate DIR), shared by both ends so the files they
 * meet at are named in one place: each vm-sim writes DIR/<id>.acked at its handoff's ack and
 * starts its workload once DIR/go exists; whoever started them writes go when all are acked.
 */
import * as fs from 'node:fs';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';

/** How often a gated vm-sim looks for the go file. */
const WAIT_POLL_MS = 2;
/** How often the opener looks for the VMs' acks. */
const OPEN_POLL_MS = 5;

const ackedFile = (dir: string, id: string): string => join(dir, `${id}.acked`);
const goFile = (dir: string): string => join(dir, 'go');

/**
 * vm-sim's side: says the handoff of `id` was acked, then waits for the go file. Its timer does
 * not keep the process alive: a run that ends before the gate opens still exits.
 */
export async function waitAtGate(dir: string, id: string): Promise<void> {
  fs.writeFileSync(ackedFile(dir, id), '');
  while (!fs.existsSync(goFile(dir))) await delay(WAIT_POLL_MS, undefined, { ref: false });
}

/**
 * The opener's side: writes the go file once every VM of `ids` said its handoff was acked, or
 * ended (`ended()` counts those; a VM that failed before its ack must not hold the others
 * back). Resolves when the gate is open.
 */
export async function openGate(
  dir: string,
  ids: readonly string[],
  ended: () => number,
): Promise<void> {
  const acked = (): number => ids.filter((id) => fs.existsSync(ackedFile(dir, id))).length;
  while (acked() + ended() < ids.length) await delay(OPEN_POLL_MS);
  fs.writeFileSync(goFile(dir), '');
}
