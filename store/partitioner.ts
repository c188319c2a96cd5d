/**
 * The partitioner: 32-bit FNV-1a over the key's UTF-8 bytes, modulo the
 * partition count. It is part of the on-disk contract (a key must keep
 * landing in the same partition across restarts and versions), so its output
 * is pinned by test vectors in test/store/partitioner.test.ts.
 */

const FNV_OFFSET = 0x811c9dc5
const FNV_PRIME = 0x01000193

export function fnv1a (key: string): number {
  let hash = FNV_OFFSET
  for (let i = 0; i < key.length; i++) {
    const unit = key.charCodeAt(i)
    if (unit >= 0x80) return fnv1aBytes(Buffer.from(key, 'utf8'))
    hash = Math.imul(hash ^ unit, FNV_PRIME)
  }
  return hash >>> 0
}

function fnv1aBytes (bytes: Uint8Array): number {
  let hash = FNV_OFFSET
  for (let i = 0; i < bytes.length; i++) hash = Math.imul(hash ^ (bytes[i] as number), FNV_PRIME)
  return hash >>> 0
}

export function partitionForKey (key: string, partitions: number): number {
  return fnv1a(key) % partitions
}
