/**
 * Follows a source QEMU's QMP socket for one migration and says when its RAM can no longer
 * change: the freeze, without an operator.
 *
 * When is a VM frozen? QEMU emits STOP once every vCPU has paused (vm_stop: runstate set,
 * pause_all_vcpus, then the event), but a STOP alone does not say the vCPUs stay paused: an
 * operator's `stop` is undone by `cont`, and serving pages of a VM that runs again would hand
 * the destination stale memory. So the rule is: **frozen = the vCPUs are stopped (STOP, or
 * `running: false` at connect) and a migration holds them stopped**: a migration is under way
 * (MIGRATION events `active`, `device`, `pre-switchover`, `postcopy-*`, or `completed`), or the
 * run state is one only a migration sets (`finish-migrate`, `postmigrate`). A VM merely `paused`
 * by an operator is not frozen; it becomes frozen when a migration of it starts. Nothing else
 * (a lost QMP connection, a timeout, `shutdown`, `io-error`) ever freezes a migration.
 *
 * The STOP of a migration is acted on as soon as it arrives, without a QMP command: QEMU holds
 * its main lock while it saves device state after that STOP, so a command would wait for the
 * device state to be sent, and the destination, which reads a few guest pages while loading that
 * state, waits for the freeze.
 *
 * And if the VM runs again after the freeze (RESUME before the migration completed: a failed or
 * cancelled migration restarts the source, or an operator `cont`s it), the pages already served
 * may be stale: the migration is aborted, and the destination's guest waits rather than reads
 * them.
 *
 * To see migration states the `events` migration capability must be on: the follower turns it
 * on (QEMU allows it while no migration runs; it only adds MIGRATION events). Errors (the socket
 * absent, not QMP, the connection lost before the freeze) carry QMP_* codes, are logged and
 * shown in the migration's status; the migration then stays as it was (`yabusame freeze` still
 * works).
 */
import type { Logger } from '../ops/log.js';
import { connectQmp, QmpError, type QmpClient, type QmpEvent } from '../qemu/qmp.js';

/** connecting → following → frozen; failed or closed end it. */
export type QmpFollowState = 'connecting' | 'following' | 'frozen' | 'failed' | 'closed';

export interface QmpFollowStatus {
  /** The source QEMU's QMP socket. */
  path: string;
  state: QmpFollowState;
  /** QEMU's run state at the last query (`running`, `paused`, `postmigrate`, …), if known. */
  runState?: string;
  /** The last migration status QEMU reported (`active`, `completed`, …), if any. */
  migration?: string;
  /** Why following failed, or why the migration was aborted. */
  error?: { code: string; message: string };
}

/**
 * QMP_CONNECT, QMP_GREETING, QMP_PROTOCOL, QMP_COMMAND, QMP_TIMEOUT: following never started
 * (or a command failed); QMP_CLOSED: the connection was lost before the freeze;
 * QMP_VM_RESUMED: the VM ran again after the freeze (the migration is aborted).
 */
export type QmpFollowCode = QmpError['code'] | 'QMP_VM_RESUMED';

export interface QmpFollowHooks {
  /** The VM is stopped for a migration: mark the migration frozen. */
  freeze(why: string): void;
  /** The VM ran again after the freeze: abort the migration. */
  abort(code: QmpFollowCode, message: string): void;
  /** True once the migration is frozen, whoever froze it. */
  isFrozen(): boolean;
  /** A coded failure (metric label). */
  error(code: QmpFollowCode): void;
  log: Logger;
}

export interface QmpFollowOptions {
  /** Connecting, the greeting and each command of the initial queries, ms. Default 5000. */
  timeoutMs?: number;
}

/** Migration statuses during which QEMU keeps a stopped VM stopped (qapi MigrationStatus). */
const MIGRATING = new Set([
  'active',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover',
  'device',
  'pre-switchover',
  'wait-unplug',
]);
/** Run states only a migration sets (qapi RunState): its vCPUs stopped for it. */
const STOPPED_BY_MIGRATION = new Set(['finish-migrate', 'postmigrate']);

export class QmpFollower {
  private stateValue: QmpFollowState = 'connecting';
  private qmp: QmpClient | null = null;
  private error: { code: string; message: string } | undefined;
  /** The VM's vCPUs run (query-status `running`, then STOP and RESUME events). */
  private running = true;
  private runState: string | undefined;
  private migration: string | undefined;
  /** A migration holds the VM: one under way, or one that completed while we followed. */
  private migrating = false;
  /** Events seen: a query answered while one arrived is asked again. */
  private events = 0;
  private synced = false;
  private closing = false;

  constructor(
    readonly path: string,
    private readonly hooks: QmpFollowHooks,
    private readonly opts: QmpFollowOptions = {},
  ) {}

  get state(): QmpFollowState {
    return this.stateValue;
  }

  status(): QmpFollowStatus {
    return {
      path: this.path,
      state: this.stateValue,
      ...(this.runState !== undefined ? { runState: this.runState } : {}),
      ...(this.migration !== undefined ? { migration: this.migration } : {}),
      ...(this.error ? { error: { ...this.error } } : {}),
    };
  }

  /** Connects and follows; never throws (failures end in state `failed`). */
  async start(): Promise<void> {
    const timeoutMs = this.opts.timeoutMs ?? 5000;
    let qmp: QmpClient;
    try {
      qmp = await connectQmp(this.path, { timeoutMs });
    } catch (err) {
      this.fail(err);
      return;
    }
    if (this.closing) {
      await qmp.close();
      return;
    }
    this.qmp = qmp;
    qmp.on('event', (ev) => this.onEvent(ev));
    qmp.on('close', (err) => this.onClose(err));
    try {
      await this.sync(timeoutMs);
    } catch (err) {
      this.fail(err);
      await qmp.close();
      return;
    }
    if (this.closing) return;
    this.synced = true;
    if (this.stateValue === 'connecting') this.stateValue = 'following';
    this.hooks.log.info('following the source QEMU over QMP', {
      qmp: this.path,
      runState: this.runState,
      migration: this.migration ?? null,
    });
    this.evaluate('at connect');
  }

  /** Stops following (the migration completed, was aborted or forgotten). */
  close(): void {
    if (this.closing) return;
    this.closing = true;
    if (this.stateValue === 'connecting' || this.stateValue === 'following') {
      this.stateValue = 'closed';
    }
    void this.qmp?.close();
  }

  /**
   * The VM's state from QEMU: query-status and query-migrate, asked again if an event arrived
   * meanwhile (their replies are then not known to be newer than it), and the `events`
   * capability turned on unless a migration already runs (QEMU refuses the change then).
   */
  private async sync(timeoutMs: number): Promise<void> {
    for (let attempt = 0; attempt < 10; attempt++) {
      const seen = this.events;
      const status = await this.command<{ running: boolean; status: string }>(
        'query-status',
        undefined,
        timeoutMs,
      );
      const mig = await this.command<{ status?: string }>('query-migrate', undefined, timeoutMs);
      const caps = await this.command<{ capability: string; state: boolean }[]>(
        'query-migrate-capabilities',
        undefined,
        timeoutMs,
      );
      const migrating = mig.status !== undefined && MIGRATING.has(mig.status);
      let eventsOn = caps.some((c) => c.capability === 'events' && c.state);
      let refused: QmpError | undefined;
      if (!eventsOn && !migrating) {
        try {
          await this.command(
            'migrate-set-capabilities',
            { capabilities: [{ capability: 'events', state: true }] },
            timeoutMs,
          );
          eventsOn = true;
        } catch (err) {
          if (!(err instanceof QmpError && err.code === 'QMP_COMMAND')) throw err;
          refused = err;
        }
      }
      if (this.events !== seen) continue;
      this.running = status.running;
      this.runState = status.status;
      this.migration = mig.status;
      // A `completed` here may be an earlier migration's: only `postmigrate` says it stopped
      // the VM. A migration under way is seen without events too (its STOP still comes).
      this.migrating = migrating;
      if (!eventsOn && !migrating) {
        throw new QmpError(
          'QMP_COMMAND',
          `cannot turn on the "events" migration capability: ${refused?.message ?? 'refused'}`,
          { cause: refused },
        );
      }
      return;
    }
    throw new QmpError('QMP_PROTOCOL', 'QEMU kept sending events; cannot read its state');
  }

  private command<T>(
    name: string,
    args: Record<string, unknown> | undefined,
    timeoutMs: number,
  ): Promise<T> {
    const qmp = this.qmp!;
    let timer: NodeJS.Timeout | undefined;
    return Promise.race([
      qmp.execute<T>(name, args),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new QmpError('QMP_TIMEOUT', `${name}: no reply within ${timeoutMs} ms`)),
          timeoutMs,
        );
      }),
    ]).finally(() => clearTimeout(timer));
  }

  private onEvent(ev: QmpEvent): void {
    this.events++;
    let relevant = true;
    switch (ev.event) {
      case 'STOP':
        this.running = false;
        this.runState = undefined;
        break;
      case 'RESUME':
        this.running = true;
        this.runState = 'running';
        break;
      case 'MIGRATION': {
        const status = ev.data['status'];
        if (typeof status !== 'string') {
          relevant = false;
          break;
        }
        this.migration = status;
        this.migrating = MIGRATING.has(status) || status === 'completed';
        break;
      }
      default:
        relevant = false;
    }
    if (relevant && this.synced) this.evaluate(`${ev.event} event`);
    this.hooks.log.debug('QMP event', { event: ev.event, data: ev.data, state: this.stateValue });
  }

  private evaluate(when: string): void {
    if (this.closing || this.stateValue === 'failed') return;
    const frozen = this.hooks.isFrozen();
    if (this.running) {
      if (!frozen) return;
      const message =
        'the source VM runs again after its migration was frozen: pages already served may be ' +
        'stale, so the migration is aborted (the destination guest waits rather than read them)';
      this.hooks.log.error('source VM resumed after the freeze; aborting the migration', {
        code: 'QMP_VM_RESUMED',
        qmp: this.path,
        migration: this.migration ?? null,
      });
      this.error = { code: 'QMP_VM_RESUMED', message };
      this.stateValue = 'failed';
      this.hooks.error('QMP_VM_RESUMED');
      this.hooks.abort('QMP_VM_RESUMED', message);
      this.close();
      return;
    }
    if (frozen) {
      this.stateValue = 'frozen';
      return;
    }
    const byMigration =
      this.migrating || (this.runState !== undefined && STOPPED_BY_MIGRATION.has(this.runState));
    if (!byMigration) return;
    this.stateValue = 'frozen';
    const why = `QMP ${when}: vCPUs stopped${this.runState ? ` (${this.runState})` : ''}`;
    this.hooks.log.info('source VM stopped for migration: freezing', {
      qmp: this.path,
      when,
      runState: this.runState ?? null,
      migration: this.migration ?? null,
    });
    this.hooks.freeze(why);
  }

  private onClose(err: QmpError | undefined): void {
    if (this.closing || err === undefined) return;
    if (this.stateValue === 'frozen' || this.hooks.isFrozen()) {
      // Frozen already: nothing to decide any more, but a RESUME can no longer be seen.
      this.hooks.log.info('QMP connection to the source QEMU closed after the freeze', {
        qmp: this.path,
      });
      this.stateValue = 'closed';
      this.closing = true;
      return;
    }
    this.fail(
      new QmpError(
        'QMP_CLOSED',
        `the QMP connection closed before the VM stopped for migration (${err.message}); ` +
          'the migration stays unfrozen: `yabusame freeze` once the VM is stopped for good',
      ),
    );
  }

  private fail(err: unknown): void {
    if (this.stateValue === 'failed' || this.closing) return;
    const code: QmpFollowCode = err instanceof QmpError ? err.code : 'QMP_PROTOCOL';
    const message = err instanceof Error ? err.message : String(err);
    this.error = { code, message };
    this.stateValue = 'failed';
    this.hooks.error(code);
    this.hooks.log.warn('cannot follow the source QEMU over QMP; the migration is not frozen', {
      code,
      qmp: this.path,
      reason: message,
    });
  }
}
