/**
 * The gateway id is part of every dedupe id the bridge sends and of the
 * bridge's client ids upstream, so it must not change by itself. The host
 * name did: a container gets a new one at every start. The id is therefore
 * kept in `<dataDir>/gateway-id` (one line, the id), written on the first
 * start; a configured `gatewayId` wins, and a configured id that differs from
 * the stored one is reported (and then stored), since upstreams see a new
 * gateway from then on.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, writeSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import path from 'node:path'
import { GatewayError } from '../errors.ts'

export const GATEWAY_ID_FILE = 'gateway-id'

/** Lower-case letters and digits: valid as a config name, a topic level and an MQTT client id part. */
export function generateGatewayId (): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789'
  return `gw-${[...randomBytes(12)].map((b) => alphabet[b % alphabet.length]).join('')}`
}

export function readStoredGatewayId (dataDir: string): string | undefined {
  let text: string
  try {
    text = readFileSync(path.join(dataDir, GATEWAY_ID_FILE), 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    // No file yet, or no directory at all: opening the data directory reports the latter with its own GW_DATA_DIR_ code.
    if (code === 'ENOENT' || code === 'ENOTDIR') return undefined
    throw new GatewayError('GW_DATA_DIR_UNUSABLE', `cannot read ${path.join(dataDir, GATEWAY_ID_FILE)}: ${(err as Error).message}`, { cause: err })
  }
  const id = text.trim()
  return id === '' ? undefined : id
}

/**
 * Written through a temporary file, fsync'd, and a rename, so neither a crash nor a power loss leaves an empty id
 * behind (the id is part of every dedupe id: a new one would make upstreams take resent records as new).
 */
export function storeGatewayId (dataDir: string, id: string): void {
  mkdirSync(dataDir, { recursive: true })
  const file = path.join(dataDir, GATEWAY_ID_FILE)
  const fd = openSync(`${file}.tmp`, 'w')
  try {
    writeSync(fd, `${id}\n`)
    fsyncSync(fd)
  } finally {
    closeSync(fd)
  }
  renameSync(`${file}.tmp`, file)
}

export interface GatewayIdChoice {
  /** The id this start uses. */
  readonly id: string
  /** The id the data directory held, if any. */
  readonly stored: string | undefined
  /** The configured id differs from the stored one. */
  readonly changed: boolean
}

/** The configured id, or the stored one, or a new one. Reads only; `storeGatewayId` once the config is valid. */
export function chooseGatewayId (dataDir: string, configured: string | undefined): GatewayIdChoice {
  const stored = readStoredGatewayId(dataDir)
  const id = configured ?? stored ?? generateGatewayId()
  return { id, stored, changed: stored !== undefined && stored !== id }
}
