/** Which records a former primary holds that the new primary lacks, from the start of the next term (terms.ts), without a database. */
import { describe, expect, it } from 'vitest'
import { lostTail } from '../../../gateway/replication/terms.ts'

describe('lostTail', () => {
  const next = { epoch: 3, at: 0, starts: { 'default/telemetry': [10, 4, 7] } }

  it('names each partition\'s offsets past where the next term began', () => {
    expect(lostTail({ 'default/telemetry': [12, 4, 9] }, next)).toEqual([
      { stream: 'default/telemetry', partition: 0, from: 10, to: 12 },
      { stream: 'default/telemetry', partition: 2, from: 7, to: 9 },
    ])
  })

  it('names nothing when the new primary had it all', () => {
    expect(lostTail({ 'default/telemetry': [10, 4, 7] }, next)).toEqual([])
    expect(lostTail({ 'default/telemetry': [9, 4, 7] }, next)).toEqual([])
  })

  it('names a whole stream or partition the next term did not know', () => {
    expect(lostTail({ 'default/other': [3], 'default/telemetry': [10, 4, 7, 2] }, next)).toEqual([
      { stream: 'default/other', partition: 0, from: 0, to: 3 },
      { stream: 'default/telemetry', partition: 3, from: 0, to: 2 },
    ])
  })
})
