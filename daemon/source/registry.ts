import { statSync } from 'node:fs';
/**
 * The migrations this source serves, by id. The page server asks it to accept each HELLO;
 * the control API registers, freezes and aborts through it.
 */
import { ProtocolError } from '../../protocol/errors.js';
import { validMigrationId } from '../../protocol/page-codec.js';
import type { Logger } from '../ops/log.js';
import type { SourceMetrics } from '../ops/metric-ports.js';
import type { HelloAcceptance, HelloFrame } from '../transport/server.js';
import type { SourceBulkThread } from './bulk.js';
import { SourceError } from './errors.js';
import { openImage, type ImageRegionSpec } from './image.js';
import {
  Migration,
  type MigrationEvent,
  type MigrationOptions,
  type MigrationStatus,
} from './migration.js';

export interface RegisterRequest {
  id: string;
  /** Path of the memory image file. */
  image: string;
  /** Default: one region `ram0` covering the whole file with 4 KiB pages. */
  regions?: readonly ImageRegionSpec[] | undefined;
  /** Already frozen (e.g. a snapshot file): serve at once. */
  frozen?: boolean;
}

/** One region `ram0` over the whole file, 4 KiB pages (a raw RAM dump or memory-backend-file). */
function wholeFileRegion(path: string): ImageRegionSpec[] {
  let sizeBytes: number;
  try {
    sizeBytes = statSync(path).size;
  } catch (err) {
    throw new SourceError('IMAGE_OPEN', `cannot stat image ${path}`, { cause: err });
  }
  return [{ name: 'ram0', offset: 0, sizeBytes, fileOffset: 0, pageSizeBytes: 4096 }];
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
    private readonly options: MigrationOptions = {},
  ) {}

  /** Opens the image and registers the migration. Throws SourceError (MIGRATION_EXISTS, IMAGE_*). */
  register(req: RegisterRequest): MigrationStatus {
    if (!validMigrationId(req.id)) {
      throw new SourceError('INVALID_ID', `migration id ${JSON.stringify(req.id)} is malformed`);
    }
    if (this.migrations.has(req.id)) {
      throw new SourceError('MIGRATION_EXISTS', `migration ${req.id} is already registered`);
    }
    const image = openImage(req.image, req.regions ?? wholeFileRegion(req.image));
    const m = new Migration(
      req.id,
      image,
      this.metrics,
      this.log.child({ migration: req.id }),
      (event) => this.emit(event),
      this.bulk,
      this.options,
    );
    this.migrations.set(req.id, m);
    this.emit({ type: 'registered', id: req.id });
    if (req.frozen) m.freeze();
    return m.status();
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

  /** The page server's HELLO hook. Throws ProtocolError UNKNOWN_MIGRATION or BAD_STATE. */
  acceptHello = (hello: HelloFrame): HelloAcceptance => {
    const m = this.migrations.get(hello.migrationId);
    if (!m) throw new ProtocolError('UNKNOWN_MIGRATION', `no migration ${hello.migrationId} here`);
    m.checkHello(hello.channel);
    return { regions: m.image.regionTable(), attach: (channel) => m.attach(channel) };
  };

  /** Releases every image (daemon shutdown); states are left as they are. */
  async dispose(): Promise<void> {
    await Promise.all([...this.migrations.values()].map((m) => m.dispose()));
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
