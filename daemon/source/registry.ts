/**
 * The migrations this source serves, by id, each with its secret. The page server asks it to
 * accept each HELLO (the proof of the migration's secret, unless authentication is off); the
 * control API registers, freezes and aborts through it.
 */
import { randomBytes } from 'node:crypto';
import { parseSecret } from '../../protocol/auth.js';
import { ProtocolError } from '../../protocol/errors.js';
import { validMigrationId } from '../../protocol/page-codec.js';
import type { Logger } from '../ops/log.js';
import type { SourceMetrics } from '../ops/metric-ports.js';
import type { HelloAcceptance, HelloFrame } from '../transport/server.js';
import type { SourceBulkThread } from './bulk.js';
import { authenticate } from './auth.js';
import { SourceError } from './errors.js';
import { QmpFollower } from './qmp-follow.js';
import { openImage, type ImageRegionSpec, type ImageRoot } from './image.js';
import {
  Migration,
  type MigrationEvent,
  type MigrationOptions,
  type MigrationStatus,
} from './migration.js';

export interface RegisterRequest {
  id: string;
  /** The memory image file, beneath the image root (absolute, or relative to the root). */
  image: string;
  /** Default: one region `ram0` covering the whole file with 4 KiB pages. */
  regions?: readonly ImageRegionSpec[] | undefined;
  /** Already frozen (e.g. a snapshot file): serve at once. */
  frozen?: boolean | undefined;
  /** The migration's secret (hex, 16..64 bytes); generated when absent and auth is on. */
  secret?: string | undefined;
  /**
   * The source QEMU's QMP socket: followed, and the migration frozen when QEMU stops the VM for
   * its migration (qmp-follow.ts).
   */
  qmp?: string | undefined;
}

export interface Registered {
  status: MigrationStatus;
  /** The secret this source generated, returned this once; absent when it was given. */
  generatedSecret?: string;
}

export interface RegistryLimits {
  /** Whether every page connection must prove its migration's secret. */
  authRequired: boolean;
  /** Migrations registered at once. */
  maxMigrations: number;
}

export type MigrationListener = (event: MigrationEvent, status: MigrationStatus) => void;

export class MigrationRegistry {
  private readonly migrations = new Map<string, Migration>();
  /** Aborted migrations whose image is still being released. */
  private readonly forgotten = new Map<string, Migration>();
  private readonly listeners = new Set<MigrationListener>();

  constructor(
    private readonly metrics: SourceMetrics,
    private readonly log: Logger,
    private readonly bulk: SourceBulkThread,
    private readonly root: ImageRoot,
    private readonly limits: RegistryLimits,
    private readonly options: MigrationOptions = {},
  ) {}

  /**
   * Opens the image and registers the migration. Throws SourceError (MIGRATION_EXISTS,
   * TOO_MANY_MIGRATIONS, INVALID_SECRET, IMAGE_*).
   */
  register(req: RegisterRequest): Registered {
    if (!validMigrationId(req.id)) {
      throw new SourceError('INVALID_ID', `migration id ${JSON.stringify(req.id)} is malformed`);
    }
    if (this.migrations.has(req.id)) {
      throw new SourceError('MIGRATION_EXISTS', `migration ${req.id} is already registered`);
    }
    if (this.migrations.size + this.forgotten.size >= this.limits.maxMigrations) {
      throw new SourceError(
        'TOO_MANY_MIGRATIONS',
        `already ${this.limits.maxMigrations} migrations here (maxMigrations)`,
      );
    }
    let secret: Buffer | null = null;
    let generatedSecret: string | undefined;
    if (req.secret !== undefined) {
      secret = parseSecret(req.secret);
      if (!secret) {
        throw new SourceError('INVALID_SECRET', 'the secret must be 16..64 bytes of lowercase hex');
      }
    } else if (this.limits.authRequired) {
      secret = randomBytes(32);
      generatedSecret = secret.toString('hex');
    }
    const image = openImage(this.root, req.image, req.regions);
    const m = new Migration(
      req.id,
      image,
      secret,
      this.metrics,
      this.log.child({ migrationId: req.id }),
      (event) => this.emit(event),
      this.bulk,
      this.options,
    );
    this.migrations.set(req.id, m);
    this.emit({ type: 'registered', id: req.id });
    if (req.frozen) m.freeze();
    if (req.qmp !== undefined) this.follow(m, req.qmp);
    return { status: m.status(), ...(generatedSecret ? { generatedSecret } : {}) };
  }

  freeze(id: string): MigrationStatus {
    const m = this.require(id);
    m.freeze();
    return m.status();
  }

  /**
   * Aborts a migration that is still registered or frozen (releasing its image) and forgets it;
   * a complete one is just forgotten. Returns its last status.
   */
  abort(id: string): MigrationStatus {
    const m = this.require(id);
    if (m.state === 'registered' || m.state === 'frozen') m.abort();
    this.migrations.delete(id);
    // Kept until its image is closed: released(id) waits for it.
    this.forgotten.set(id, m);
    void m.released().then(() => {
      if (this.forgotten.get(id) === m) this.forgotten.delete(id);
    });
    return m.status();
  }

  /** Resolves once the image of migration `id` (if it is or was here) is closed. */
  released(id: string): Promise<void> {
    return (this.migrations.get(id) ?? this.forgotten.get(id))?.released() ?? Promise.resolve();
  }

  get(id: string): Migration | undefined {
    return this.migrations.get(id);
  }

  list(): MigrationStatus[] {
    return [...this.migrations.values()].map((m) => m.status());
  }

  /** Subscribes to state events; returns the unsubscribe function. */
  onEvent(listener: MigrationListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * The page server's HELLO hook: the migration must exist and the HELLO must prove its secret.
   * Throws ProtocolError UNKNOWN_MIGRATION, AUTH_FAILED or BAD_STATE.
   */
  acceptHello = (hello: HelloFrame, nonce: Uint8Array): HelloAcceptance => {
    const m = this.migrations.get(hello.migrationId);
    if (!m) throw new ProtocolError('UNKNOWN_MIGRATION', `no migration ${hello.migrationId} here`);
    authenticate(hello, nonce, m.secret, this.limits.authRequired);
    m.checkHello(hello.channel);
    return { regions: m.image.regionTable(), attach: (channel) => m.attach(channel) };
  };

  /** Releases every image (daemon shutdown); states are left as they are. */
  async dispose(): Promise<void> {
    await Promise.all([...this.migrations.values()].map((m) => m.dispose()));
  }

  /** Follows the source QEMU of `m` over QMP: freezes it on its migration's stop. */
  private follow(m: Migration, path: string): void {
    const log = this.log.child({ migrationId: m.id });
    const follower = new QmpFollower(path, {
      freeze: () => {
        if (m.state === 'registered') m.freeze();
      },
      abort: (_code, message) => {
        if (m.state === 'registered' || m.state === 'frozen') m.abort(message);
      },
      isFrozen: () => m.state !== 'registered',
      error: (code) => this.metrics.error(code),
      log,
    });
    m.watch(follower);
    void follower.start();
  }

  private require(id: string): Migration {
    const m = this.migrations.get(id);
    if (!m) throw new SourceError('UNKNOWN_MIGRATION', `no migration ${id}`);
    return m;
  }

  private emit(event: MigrationEvent): void {
    const m = this.migrations.get(event.id);
    if (!m) return;
    const status = m.status();
    for (const l of this.listeners) {
      try {
        l(event, status);
      } catch (err) {
        this.log.error('migration listener threw', { err });
      }
    }
  }
}
