/**
 * A VMM's side of the handoff, for tests (the same client vm-sim uses).
 */
import type { HandoffClient } from '../../scripts/lib/handoff-client.js';

export { connectHandoff, type HandoffClient } from '../../scripts/lib/handoff-client.js';

/** Sends `data` with `fds` attached, in one sendmsg. */
export function sendRaw(client: HandoffClient, data: Buffer, fds: number[] = []): void {
  client.send(data, fds);
}
