/**
 * A mergeable latency histogram in microseconds, HdrHistogram's idea in a
 * few lines: exact 1 µs buckets below 1,024 µs, then 64 buckets per power of
 * two (at most 1.6 % relative error), up to 2^31 µs (35 minutes). Recording
 * is one array increment, so the load generator can record every PUBACK
 * without keeping the samples, and the histograms of several rounds and
 * several generator processes add up exactly.
 */

const LINEAR = 1024
const SUB_BITS = 6
const SUB = 1 << SUB_BITS
const LINEAR_BITS = 10 // log2(LINEAR)
const MAX_BITS = 31
const BUCKETS = LINEAR + (MAX_BITS - LINEAR_BITS) * SUB

function bucketOf (us: number): number {
  const v = us < 1 ? 0 : Math.min(Math.floor(us), 2 ** MAX_BITS - 1)
  if (v < LINEAR) return v
  const exponent = 31 - Math.clz32(v) // >= LINEAR_BITS
  const sub = (v >>> (exponent - SUB_BITS)) - SUB // the 6 bits below the leading one
  return LINEAR + (exponent - LINEAR_BITS) * SUB + sub
}

/** The lower bound of a bucket in µs (exact below 1,024 µs). */
function lowerBound (bucket: number): number {
  if (bucket < LINEAR) return bucket
  const exponent = LINEAR_BITS + Math.floor((bucket - LINEAR) / SUB)
  const sub = (bucket - LINEAR) % SUB
  return (SUB + sub) * 2 ** (exponent - SUB_BITS)
}

export class LatencyHistogram {
  readonly counts = new Float64Array(BUCKETS)
  total = 0
  maxUs = 0

  record (us: number): void {
    this.counts[bucketOf(us)]! += 1
    this.total++
    if (us > this.maxUs) this.maxUs = us
  }

  add (other: LatencyHistogram | SerializedHistogram): void {
    if (other instanceof LatencyHistogram) {
      for (let i = 0; i < BUCKETS; i++) this.counts[i]! += other.counts[i]!
    } else {
      for (const [bucket, count] of other.buckets) this.counts[bucket]! += count
    }
    this.total += other.total
    this.maxUs = Math.max(this.maxUs, other.maxUs)
  }

  /** The p-th percentile (0..100), nearest rank, as its bucket's lower bound in µs; NaN when empty. */
  percentileUs (p: number): number {
    if (this.total === 0) return NaN
    const rank = Math.max(1, Math.ceil((p / 100) * this.total))
    let seen = 0
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.counts[i]!
      if (seen >= rank) return lowerBound(i)
    }
    return this.maxUs
  }

  /** Only the non-empty buckets, for sending over IPC. */
  serialize (): SerializedHistogram {
    const buckets: Array<[number, number]> = []
    for (let i = 0; i < BUCKETS; i++) if (this.counts[i]! > 0) buckets.push([i, this.counts[i]!])
    return { buckets, total: this.total, maxUs: this.maxUs }
  }

  static from (serialized: SerializedHistogram): LatencyHistogram {
    const h = new LatencyHistogram()
    h.add(serialized)
    return h
  }
}

export interface SerializedHistogram {
  readonly buckets: ReadonlyArray<readonly [number, number]>
  readonly total: number
  readonly maxUs: number
}
