/**
 * LevelDB's own checks, run from outside LevelDB: reads every table file
 * (`*.ldb`, `*.sst`) of a database directory and verifies the CRC-32C of
 * each block. classic-level does not expose LevelDB's `paranoid_checks` or
 * `verify_checksums`, and without them LevelDB skips a block it cannot read
 * without reporting it, so this is how `edgemq check` names a damaged file.
 *
 * Table format (leveldb/doc/table_format.md), the parts read here:
 * - the file ends in a 48-byte footer: the metaindex handle and the index
 *   handle (each varint64 offset + varint64 size), padding, and the magic
 *   0xdb4775248b80fb57 (little-endian);
 * - every block is followed by a 5-byte trailer: its compression type (0 none,
 *   1 snappy) and the masked CRC-32C of the block bytes plus that type byte;
 * - the index block holds one entry per data block (prefix-compressed keys,
 *   then restart points): the key is at or after the block's last key and
 *   before the next block's first, the value the block's handle.
 * The write-ahead log (`*.log`) is not checked: LevelDB replays it at open,
 * and a log cut short by a crash is expected there.
 *
 * Reads the files only; never writes. Cost: every byte of every table, so
 * this is for `edgemq check` and for naming the file once damage is found,
 * not for every open.
 */
import { open, readdir } from 'node:fs/promises'
import path from 'node:path'

const FOOTER_BYTES = 48
const TRAILER_BYTES = 5
const MAGIC_LO = 0x8b80fb57
const MAGIC_HI = 0xdb477524

export interface TableBlock {
  /** Byte position of the block in its file. */
  readonly offset: number
  readonly size: number
  /** The index key of the block (user key, without LevelDB's 8-byte sequence suffix): at or after the block's last key. */
  readonly lastKey: Buffer
  /** The index key of the block before (exclusive lower bound of this block's keys); empty for the first block. */
  readonly afterKey: Buffer
}

export interface TableDamage {
  readonly file: string
  /** Byte position of the damaged block, or of the footer / index when the file's structure is broken. */
  readonly offset: number
  readonly problem: string
  /** The damaged data block's key bounds, when the index could be read. */
  readonly block?: TableBlock
}

export interface TableCheckReport {
  readonly files: number
  readonly blocks: number
  readonly bytes: number
  readonly damage: TableDamage[]
}

/** Verifies every block of every table file in the LevelDB directory `location`. */
export async function checkTableFiles (location: string): Promise<TableCheckReport> {
  const names = (await readdir(location)).filter((n) => n.endsWith('.ldb') || n.endsWith('.sst')).sort()
  let blocks = 0
  let bytes = 0
  const damage: TableDamage[] = []
  for (const name of names) {
    const file = path.join(location, name)
    const data = await readWhole(file)
    bytes += data.length
    let index: TableBlock[]
    try {
      index = readIndex(data)
    } catch (err) {
      damage.push({ file, offset: Math.max(0, data.length - FOOTER_BYTES), problem: (err as Error).message })
      continue
    }
    for (const block of index) {
      blocks++
      const problem = blockProblem(data, block.offset, block.size)
      if (problem !== undefined) damage.push({ file, offset: block.offset, problem, block })
    }
  }
  return { files: names.length, blocks, bytes, damage }
}

/** The data blocks of one table file, with their key bounds (for tests that damage a chosen block). */
export async function tableBlocks (file: string): Promise<TableBlock[]> {
  return readIndex(await readWhole(file))
}

async function readWhole (file: string): Promise<Buffer> {
  const handle = await open(file, 'r')
  try {
    return await handle.readFile()
  } finally {
    await handle.close()
  }
}

function readIndex (data: Buffer): TableBlock[] {
  if (data.length < FOOTER_BYTES) throw new Error(`file of ${data.length} bytes is shorter than a table footer`)
  const footer = data.subarray(data.length - FOOTER_BYTES)
  if (footer.readUInt32LE(40) !== MAGIC_LO || footer.readUInt32LE(44) !== MAGIC_HI) throw new Error('footer has no table magic number (file cut short or overwritten at its end)')
  const at = { i: 0 }
  varint(footer, at); varint(footer, at) // metaindex handle
  const indexOffset = varint(footer, at)
  const indexSize = varint(footer, at)
  const problem = blockProblem(data, indexOffset, indexSize)
  if (problem !== undefined) throw new Error(`index block at byte ${indexOffset}: ${problem}`)
  const contents = blockContents(data, indexOffset, indexSize)
  const out: TableBlock[] = []
  let afterKey: Buffer = Buffer.alloc(0)
  for (const { key, value } of blockEntries(contents)) {
    const v = { i: 0 }
    const lastKey = key.subarray(0, Math.max(0, key.length - 8))
    out.push({ offset: varint(value, v), size: varint(value, v), lastKey, afterKey })
    afterKey = lastKey
  }
  return out
}

/** Why the block at `offset` is damaged, or undefined when its checksum holds. */
function blockProblem (data: Buffer, offset: number, size: number): string | undefined {
  if (offset + size + TRAILER_BYTES > data.length) return `block of ${size} bytes runs past the end of the file`
  const type = data[offset + size] as number
  if (type !== 0 && type !== 1) return `unknown compression type ${type}`
  const stored = data.readUInt32LE(offset + size + 1)
  const actual = crc32c(data.subarray(offset, offset + size + 1))
  if (mask(actual) !== stored) return 'block checksum mismatch'
  return undefined
}

function blockContents (data: Buffer, offset: number, size: number): Buffer {
  const raw = data.subarray(offset, offset + size)
  return data[offset + size] === 1 ? snappyDecompress(raw) : raw
}

function * blockEntries (block: Buffer): Generator<{ key: Buffer, value: Buffer }> {
  const restarts = block.readUInt32LE(block.length - 4)
  const end = block.length - 4 * (restarts + 1)
  let key = Buffer.alloc(0)
  const at = { i: 0 }
  while (at.i < end) {
    const shared = varint(block, at)
    const unshared = varint(block, at)
    const valueLength = varint(block, at)
    key = Buffer.concat([key.subarray(0, shared), block.subarray(at.i, at.i + unshared)])
    at.i += unshared
    yield { key, value: block.subarray(at.i, at.i + valueLength) }
    at.i += valueLength
  }
}

function varint (buf: Buffer, at: { i: number }): number {
  let result = 0
  for (let shift = 0; shift < 64; shift += 7) {
    if (at.i >= buf.length) throw new Error('varint runs past the end of its block')
    const byte = buf[at.i++] as number
    result += (byte & 0x7f) * 2 ** shift
    if ((byte & 0x80) === 0) return result
  }
  throw new Error('varint longer than 10 bytes')
}

// ---------------------------------------------------------------- CRC-32C (Castagnoli), as LevelDB's util/crc32c

const CRC32C_TABLE = (() => {
  const table = new Uint32Array(256)
  for (let n = 0; n < 256; n++) {
    let c = n
    for (let k = 0; k < 8; k++) c = (c & 1) !== 0 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1
    table[n] = c >>> 0
  }
  return table
})()

export function crc32c (buf: Uint8Array): number {
  let crc = 0xffffffff
  for (let i = 0; i < buf.length; i++) crc = (CRC32C_TABLE[(crc ^ (buf[i] as number)) & 0xff] as number) ^ (crc >>> 8)
  return (crc ^ 0xffffffff) >>> 0
}

/** LevelDB stores checksums masked (util/crc32c.h: Mask), since CRCs of data containing CRCs are weak. */
function mask (crc: number): number {
  return ((((crc >>> 15) | (crc << 17)) >>> 0) + 0xa282ead8) >>> 0
}

// ---------------------------------------------------------------- snappy (index blocks are compressed)

function snappyDecompress (src: Buffer): Buffer {
  const at = { i: 0 }
  const length = varint(src, at)
  const out = Buffer.alloc(length)
  let o = 0
  while (at.i < src.length) {
    const tag = src[at.i++] as number
    if ((tag & 3) === 0) {
      let len = tag >>> 2
      if (len >= 60) {
        const bytes = len - 59
        len = 0
        for (let b = 0; b < bytes; b++) len += (src[at.i++] as number) * 2 ** (8 * b)
      }
      len += 1
      if (at.i + len > src.length || o + len > length) throw new Error('snappy literal runs past its block')
      src.copy(out, o, at.i, at.i + len)
      at.i += len
      o += len
      continue
    }
    let len: number
    let offset: number
    if ((tag & 3) === 1) {
      len = ((tag >>> 2) & 7) + 4
      offset = ((tag >>> 5) << 8) | (src[at.i++] as number)
    } else if ((tag & 3) === 2) {
      len = (tag >>> 2) + 1
      offset = src.readUInt16LE(at.i)
      at.i += 2
    } else {
      len = (tag >>> 2) + 1
      offset = src.readUInt32LE(at.i)
      at.i += 4
    }
    if (offset === 0 || offset > o || o + len > length) throw new Error('snappy copy points outside its block')
    for (let k = 0; k < len; k++, o++) out[o] = out[o - offset] as number
  }
  if (o !== length) throw new Error('snappy block is shorter than its stated length')
  return out
}
