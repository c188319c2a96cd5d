/**
 * Shared by the NATS bridge tests: an edge gateway with one NATS upstream
 * `js` (fast reconnects, a short commit interval), and the exactly-once and
 * order checks of a JetStream stream against the edge's own log.
 */
import { writeFile } from 'node:fs/promises'
import path from 'node:path'
import { createAccount, createOperator, createUser, encodeAccount, encodeOperator, encodeUser, fmtCreds } from '@nats-io/jwt'
import { expect } from 'vitest'
import { startGatewayProcess, writeConfig, type GatewayProcess } from './gateway-process.ts'
import type { LoggedRecord } from './log-reader.ts'
import type { StoredNatsMessage } from './nats-process.ts'

export async function startNatsEdge (dir: string, upstream: Record<string, unknown>, extra: Record<string, unknown> = {}): Promise<GatewayProcess> {
  const { nats, ...rest } = upstream as { nats?: Record<string, unknown> }
  const config = await writeConfig(dir, {
    gatewayId: 'edge-1',
    mqtt: { listeners: [{ type: 'tcp', port: 0 }] },
    ...extra,
    bridge: {
      commitIntervalMs: 100,
      upstreams: [{
        name: 'js', forward: [{ stream: 'telemetry' }], reconnectMinMs: 50, reconnectMaxMs: 500, maxInflight: 256,
        ...rest,
        nats: { minDuplicateWindowMs: 60_000, ...nats, stream: { create: true, duplicateWindowMs: 600_000, ...nats?.stream as object } },
      }],
    },
  })
  return await startGatewayProcess({ dataDir: `${dir}/data`, config })
}

/** Every telemetry record of the edge is in the stream exactly once by message id, with its payload. */
export function expectExactlyOnce (edge: readonly LoggedRecord[], stored: readonly StoredNatsMessage[], site = 'edge-1'): void {
  const records = edge.filter((r) => r.stream === 'default/telemetry')
  const ids = stored.map((m) => m.msgId)
  expect(new Set(ids).size).toBe(ids.length) // nothing twice
  expect(stored).toHaveLength(records.length) // nothing missing
  const byId = new Map(stored.map((m) => [m.msgId, m]))
  for (const r of records) {
    const m = byId.get(`${site}/default/telemetry/${r.partition}/${r.offset}`)
    expect(m?.payload, `record ${r.partition}/${r.offset}`).toBe(r.payload)
  }
}

/** expectExactlyOnce, and each partition's offsets rise in stream order. */
export function expectExactlyOnceInOrder (edge: readonly LoggedRecord[], stored: readonly StoredNatsMessage[], site = 'edge-1'): void {
  expectExactlyOnce(edge, stored, site)
  const last = new Map<string, number>()
  for (const m of stored) {
    const partition = m.headers['Edgemq-Partition'] as string
    const offset = Number(m.headers['Edgemq-Offset'])
    expect(offset, `partition ${partition} in stream order`).toBeGreaterThan(last.get(partition) ?? -1)
    last.set(partition, offset)
  }
}

/** NATS decentralized auth for one nats-server: its config lines, and a user's .creds file (user JWT and NKey seed). */
export interface NatsOperatorSetup {
  /** `operator`, `system_account` and a memory resolver preloaded with both accounts' JWTs. */
  readonly config: readonly string[]
  /** The user's .creds file (written with mode 0600), as `nats.credsFile` takes it. */
  readonly credsFile: string
  /** The same creds, for a test client's credsAuthenticator. */
  readonly creds: Uint8Array
}

/**
 * An operator, a system account, an account `EDGE` with JetStream enabled (no limits; an account JWT without
 * JetStream limits has JetStream off) and one user of it, signed with @nats-io/jwt as `nsc` would sign them.
 */
export async function natsOperatorSetup (dir: string): Promise<NatsOperatorSetup> {
  const operator = createOperator()
  const system = createAccount()
  const account = createAccount()
  const user = createUser()
  const unlimited = { subs: -1, data: -1, payload: -1, imports: -1, exports: -1, wildcards: true, conn: -1, leaf: -1 }
  const jetStream = { mem_storage: -1, disk_storage: -1, streams: -1, consumer: -1 }
  const operatorJwt = await encodeOperator('edgemq-test', operator, { system_account: system.getPublicKey() })
  const systemJwt = await encodeAccount('SYS', system, { limits: unlimited }, { signer: operator })
  const accountJwt = await encodeAccount('EDGE', account, { limits: { ...unlimited, ...jetStream } }, { signer: operator })
  const creds = fmtCreds(await encodeUser('edge-1', user, account), user)
  const credsFile = path.join(dir, 'edge-1.creds')
  await writeFile(credsFile, creds, { mode: 0o600 })
  return {
    config: [
      `operator: "${operatorJwt}"`,
      `system_account: "${system.getPublicKey()}"`,
      'resolver: MEMORY',
      `resolver_preload: { ${system.getPublicKey()}: "${systemJwt}", ${account.getPublicKey()}: "${accountJwt}" }`,
    ],
    credsFile,
    creds,
  }
}
