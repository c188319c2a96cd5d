/**
 * Damages one stored batch of a closed store's raw database the way a disk does: a flipped byte in its checksum field
 * (the batch fails its checks: STORE_CORRUPT_BATCH), or the whole entry gone (as LevelDB skipping a table block it
 * cannot read: its offsets are missing, STORE_DAMAGED).
 */
import { decodeMeta, keys } from '../../store/format.ts'
import type { LevelDatabase } from '../../store/index.ts'

const binary = { keyEncoding: 'buffer', valueEncoding: 'buffer' } as const

export async function damageBatch (raw: LevelDatabase, stream: string, partition: number, base: number, how: 'corrupt' | 'delete'): Promise<void> {
  const log = raw.sublevel<Buffer, Buffer>('log', binary) as unknown as LevelDatabase
  const meta = await log.get<Buffer, Buffer>(keys.stream(stream), binary)
  if (meta === undefined) throw new Error(`no stream ${stream}`)
  const key = keys.batch(decodeMeta<{ id: number }>(meta).id, partition, base)
  const value = await log.get<Buffer, Buffer>(key, binary)
  if (value === undefined) throw new Error(`no batch of ${stream}[${partition}] at ${base}`)
  if (how === 'delete') {
    await log.del<Buffer>(key, { keyEncoding: 'buffer' })
    return
  }
  const copy = Buffer.from(value)
  copy[3] = (copy[3] as number) ^ 0xff
  await log.put<Buffer, Buffer>(key, copy, binary)
}
