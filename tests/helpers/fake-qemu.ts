/**
 * A fake QEMU monitor on a real UNIX socket, speaking QMP as QEMU 7.2 does (the greeting,
 * `\r\n`-terminated replies with the command's id, events with timestamps), with a small model
 * of the VM behind it: run state, migration status, migration capabilities. Tests drive the VM
 * (`stop()`, `resume()`, `migration()`) and read the commands it got.
 */
import type { Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

// QEMU 7.2's greeting, as Debian's build sends it.
export const QMP_GREETING =
  '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n';

export interface FakeVm {
  running: boolean;
  /** qapi RunState: running, paused, finish-migrate, postmigrate, inmigrate, … */
  status: string;
  /** query-migrate's status; undefined: no migration yet (QEMU then returns {}). */
  migration: string | undefined;
  capabilities: Record<string, boolean>;
}

type Reply = { return: unknown } | { error: { class: string; desc: string } };
/** Answers a command; return undefined to fall back to the model's answer. */
export type CommandHook = (
  name: string,
  args: Record<string, unknown> | undefined,
) => Reply | undefined | 'no-reply';

const ACTIVE = new Set(['setup', 'active', 'postcopy-active', 'device', 'pre-switchover']);

export class FakeQemu {
  readonly commands: { execute: string; arguments?: Record<string, unknown> }[] = [];
  hook: CommandHook | null = null;
  private client: net.Socket | null = null;
  private readonly clientWaiters: (() => void)[] = [];

  private constructor(
    readonly path: string,
    readonly vm: FakeVm,
    private readonly server: net.Server,
  ) {}

  static async start(t: Test, vm: Partial<FakeVm> = {}): Promise<FakeQemu> {
    const dir = mkdtempSync(join(tmpdir(), 'yabusame-fake-qemu-'));
    const path = join(dir, 'qmp.sock');
    const model: FakeVm = {
      running: true,
      status: 'running',
      migration: undefined,
      capabilities: { events: false, 'x-ignore-shared': false },
      ...vm,
    };
    let fake: FakeQemu | null = null;
    // Like QEMU's chardev, one client at a time: later ones wait in the backlog.
    const server = net.createServer((sock) => fake!.accept(sock));
    server.maxConnections = 1;
    await new Promise<void>((r) => server.listen(path, r));
    fake = new FakeQemu(path, model, server);
    t.teardown(async () => {
      fake!.client?.destroy();
      await new Promise((r) => server.close(r));
      rmSync(dir, { recursive: true, force: true });
    });
    return fake;
  }

  /** Resolves once a client is connected (now or later). */
  connected(): Promise<void> {
    if (this.client) return Promise.resolve();
    return new Promise((r) => this.clientWaiters.push(r));
  }

  /** Names of the commands received, in order (qmp_capabilities left out). */
  executed(): string[] {
    return this.commands.map((c) => c.execute).filter((c) => c !== 'qmp_capabilities');
  }

  /** Sends an event to the client (if any), stamped with the host's clock. */
  event(name: string, data?: Record<string, unknown>): void {
    const now = Date.now();
    const ts = { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 };
    const ev = { timestamp: ts, event: name, ...(data ? { data } : {}) };
    this.client?.write(`${JSON.stringify(ev)}\r\n`);
  }

  /** The vCPUs stop (an operator's `stop`: paused; a migration's: finish-migrate). */
  stop(status = 'paused'): void {
    const was = this.vm.running;
    this.vm.running = false;
    this.vm.status = status;
    if (was) this.event('STOP');
  }

  resume(): void {
    this.vm.running = true;
    this.vm.status = 'running';
    this.event('RESUME');
  }

  /** A migration status change, with its MIGRATION event if the `events` capability is on. */
  migration(status: string): void {
    this.vm.migration = status;
    if (this.vm.capabilities['events']) this.event('MIGRATION', { status });
  }

  /** Closes the client's connection (QEMU quit, or the socket was lost). */
  dropClient(): void {
    this.client?.destroy();
  }

  private accept(sock: net.Socket): void {
    this.client = sock;
    for (const w of this.clientWaiters.splice(0)) w();
    sock.on('close', () => {
      if (this.client === sock) this.client = null;
    });
    sock.on('error', () => {});
    sock.write(QMP_GREETING);
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        const cmd = JSON.parse(line) as {
          execute: string;
          arguments?: Record<string, unknown>;
          id?: unknown;
        };
        this.commands.push({
          execute: cmd.execute,
          ...(cmd.arguments ? { arguments: cmd.arguments } : {}),
        });
        const reply = this.hook?.(cmd.execute, cmd.arguments) ?? this.answer(cmd);
        if (reply === 'no-reply') continue;
        sock.write(`${JSON.stringify({ ...reply, id: cmd.id })}\r\n`);
      }
    });
  }

  private answer(cmd: { execute: string; arguments?: Record<string, unknown> }): Reply {
    const vm = this.vm;
    switch (cmd.execute) {
      case 'qmp_capabilities':
        return { return: {} };
      case 'query-status':
        return { return: { status: vm.status, singlestep: false, running: vm.running } };
      case 'query-migrate':
        return { return: vm.migration === undefined ? {} : { status: vm.migration } };
      case 'query-migrate-capabilities':
        return {
          return: Object.entries(vm.capabilities).map(([capability, state]) => ({
            capability,
            state,
          })),
        };
      case 'migrate-set-capabilities': {
        if (vm.migration !== undefined && ACTIVE.has(vm.migration)) {
          return {
            error: { class: 'GenericError', desc: "There's a migration process in progress" },
          };
        }
        const caps = (cmd.arguments?.['capabilities'] ?? []) as {
          capability: string;
          state: boolean;
        }[];
        for (const c of caps) vm.capabilities[c.capability] = c.state;
        return { return: {} };
      }
      default:
        return {
          error: {
            class: 'CommandNotFound',
            desc: `The command ${cmd.execute} has not been found`,
          },
        };
    }
  }
}
