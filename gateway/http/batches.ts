/**
 * `format=batches`: a partition's records as the log stores them, without
 * decoding and re-encoding (the store's readBatches), for consumers that
 * want a whole range fast. The response (`application/vnd.edgemq.batches+
 * cbor-seq`) is a CBOR sequence (RFC 8742) of:
 *
 * 1. a head map `{"stream", "partition", "fromOffset", "endOffset"}`;
 * 2. one CBOR byte string per stored batch, holding the batch exactly as
 *    stored (store/format.ts: magic 0xE1 or 0xE2, CRC-32, base offset, count,
 *    timestamps, columnar cbor body), in offset order, contiguous;
 * 3. a last map `{"end": {"nextOffset", "logStartOffset", "logEndOffset",
 *    "endOfRange", "records", "batches", "bytes"}}` — or, when the read
 *    failed after the head, `{"error": {"code", "message", …}}`. A response
 *    without one of them was cut short.
 *
 * Batches are whole, so the first may begin below `fromOffset` (a start
 * inside a batch) and the last may reach past `endOffset` (an end inside a
 * batch; null when the range is open-ended): **the records of the response
 * are those with fromOffset <= offset < endOffset**, and a client skips the
 * others. When a `to` time could not be placed when the head was written
 * (every record was older) and the batch that holds it arrives meanwhile,
 * the response ends before that batch (`endOfRange` false, `nextOffset` its
 * base offset); the next request places `to` from the start.
 *
 * No filter applies (the parser refuses key, topic, where and maxRecords):
 * filtering needs decoded records. `maxBytes` bounds the batch bytes
 * (whole batches, at least one). `wait` long-polls as for the other formats.
 */
import { once } from 'node:events'
import type { ServerResponse } from 'node:http'
import { Encoder } from 'cbor-x'
import { toApiError } from './errors.ts'
import { placePending } from '../query/read-plan.ts'
import { RewindWatch } from '../query/log-rewinds.ts'
import { BATCHES_MEDIA_TYPE, resolveBounds, type FetchContext, type PartitionTarget, type RecordsRequest } from './records.ts'

/** Batch bytes per store read. */
const READ_CHUNK_BYTES = 4 * 1024 * 1024

const cbor = new Encoder({ useRecords: false, mapsAsObjects: true, variableMapSize: true })

/** The head of a definite-length CBOR byte string of `length` bytes (major type 2). */
export function byteStringHead (length: number): Buffer {
  if (length < 24) return Buffer.from([0x40 | length])
  if (length < 0x100) return Buffer.from([0x58, length])
  if (length < 0x10000) {
    const b = Buffer.allocUnsafe(3)
    b[0] = 0x59
    b.writeUInt16BE(length, 1)
    return b
  }
  const b = Buffer.allocUnsafe(5)
  b[0] = 0x5a
  b.writeUInt32BE(length, 1)
  return b
}

export async function serveBatches (ctx: FetchContext, target: PartitionTarget, req: RecordsRequest, res: ServerResponse): Promise<void> {
  const { store, signal } = ctx
  const { stream, partition } = target
  let range = await resolveBounds(store, target, req)
  const rewinds = new RewindWatch(store, stream, partition)
  /** Where a reader at `offset` goes on: a standby's log rewound below it since the plan moves it back to the new end (log-rewinds.ts). */
  const notRewound = (offset: number): number => {
    const end = rewinds.movedEnd(offset)
    if (end === null) return offset
    rewinds.movedBack(offset, end)
    return end
  }

  // Before the head: place the times the index could not place yet, and long-poll until there is something to send.
  const deadline = performance.now() + req.waitMs
  for (;;) {
    range = await placePending(store, range)
    if (range.fromTime === null) range = { ...range, start: notRewound(range.start) }
    const left = deadline - performance.now()
    const readable = range.fromTime === null && range.start < store.partitionInfo(stream, partition).logEndOffset
    if (range.start >= range.end || readable || signal.aborted || left <= 0) break
    await ctx.waiters.wait(stream, partition, left, signal)
  }
  const { start, end, fromTime, toTime } = range

  res.writeHead(200, { 'content-type': BATCHES_MEDIA_TYPE, 'cache-control': 'no-store' })
  res.write(cbor.encode({ stream: target.name, partition, fromOffset: start, endOffset: Number.isFinite(end) ? end : null }))
  let next = start
  let records = 0
  let batches = 0
  let bytes = 0
  let stop: 'range' | 'log' | 'limit' | 'split' | null = null
  try {
    while (stop === null && !signal.aborted && !res.destroyed) {
      if (next >= end) { stop = 'range'; break }
      if (fromTime !== null || next >= store.partitionInfo(stream, partition).logEndOffset) { stop = 'log'; break }
      const read = await store.readBatches(stream, partition, next, {
        maxBytes: Math.max(1, Math.min(READ_CHUNK_BYTES, req.maxBytes - bytes)),
        endOffset: Number.isFinite(end) ? end : undefined,
      })
      let send = read.batches.length
      if (bytes > 0 && send > 0 && bytes + (read.batches[0]?.bytes.byteLength ?? 0) > req.maxBytes) { stop = 'limit'; break }
      if (toTime !== null) {
        // A batch holding `to` (or starting at it) ends the range; the head promised no end, so stop before it.
        const cut = read.batches.findIndex((b) => b.maxTimestamp >= (toTime as number))
        if (cut >= 0) {
          send = cut
          const bound = await store.offsetForTime(stream, partition, toTime) ?? Infinity
          stop = bound <= (read.batches[cut]?.baseOffset ?? 0) ? 'range' : 'split'
        }
      }
      if (send === 0) {
        stop ??= 'log'
        break
      }
      res.cork()
      for (let i = 0; i < send; i++) {
        const b = read.batches[i]!
        res.write(byteStringHead(b.bytes.byteLength))
        res.write(b.bytes)
        records += Math.min(end, b.baseOffset + b.count) - Math.max(start, b.baseOffset)
        batches++
        bytes += b.bytes.byteLength
        next = Math.min(end, b.baseOffset + b.count)
      }
      res.uncork()
      if (stop === null && bytes >= req.maxBytes) stop = 'limit'
      // Rejects with an AbortError when the client goes away; `once` removes its listener either way.
      if (res.writableNeedDrain) await once(res, 'drain', { signal })
    }
    next = notRewound(next)
    const info = store.partitionInfo(stream, partition)
    res.end(cbor.encode({
      end: {
        stream: target.name, partition, nextOffset: next, logStartOffset: info.logStartOffset, logEndOffset: info.logEndOffset,
        endOfRange: stop === 'range', records, batches, bytes,
      },
    }))
  } catch (err) {
    if (signal.aborted || res.destroyed) return
    res.end(cbor.encode(toApiError(err).toJSON()))
  }
}
