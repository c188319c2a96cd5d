/**
 * A follower store (a standby's) that meets offsets missing inside its log
 * while its writer goes on applying: damage, STORE_DAMAGED, every time. The
 * store looks at the database again before it says so (the writer may have
 * replaced the copy under the read, store/log-store.ts #followedChange);
 * it once called the offsets replaced ("nothing is damaged: read again",
 * STORE_LOG_REPLACED) whenever an apply moved the log's end between its
 * looks, which on a busy partition is nearly always.
 */
import { MemoryLevel } from 'memory-level'
import { afterEach, expect, it } from 'vitest'
import { openLogStore, type LevelDatabase, type LogStore } from '../../store/index.ts'
import { damageBatch } from './batch-damage.ts'
import { entriesOf, primaryLog, replaceCopy, RAW, STREAM } from './follower-copy.ts'

const opened: LogStore[] = []
afterEach(async () => { for (const s of opened.splice(0).reverse()) await s.close() })

const record = (text: string): { payload: Buffer, topic: string, qos: 1, clientId: string } => ({ payload: Buffer.from(text), topic: 't', qos: 1, clientId: 'c' })

/**
 * `db` as the follower store sees it, with a seam: each time the follower looks up a partition's metadata, `after`
 * runs before the look returns (the writer applies between two of the follower's reads).
 */
function busy (db: MemoryLevel<Buffer, Buffer>, after: () => Promise<void>): LevelDatabase {
  return new Proxy(db, {
    get (target, prop) {
      if (prop !== 'sublevel') return (typeof Reflect.get(target, prop) === 'function') ? (Reflect.get(target, prop) as (...a: unknown[]) => unknown).bind(target) : Reflect.get(target, prop)
      return (name: string, options: object) => {
        const sub = target.sublevel(name, options) as unknown as { get: (key: Buffer, o?: object) => Promise<unknown> }
        return new Proxy(sub, {
          get (s, p) {
            const value = Reflect.get(s, p, s) as unknown
            if (p !== 'get') return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(s) : value
            return async (key: Buffer, o?: object) => {
              const found = await sub.get(key, o)
              if (key[0] === 0x50) await after() // 'P': a partition's metadata (store/format.ts)
              return found
            }
          },
        })
      }
    },
  }) as unknown as LevelDatabase
}

it('a batch missing inside a busy partition\'s log is STORE_DAMAGED on every read, not "read again"', async () => {
  const copy = new MemoryLevel<Buffer, Buffer>(RAW)
  await replaceCopy(copy, await entriesOf(await primaryLog(Array.from({ length: 100 }, (_, i) => `r-${i}`))))
  // The standby's writer, applying the primary's appends as they come (here a store of its own on the same database).
  const writer = await openLogStore({ db: copy as unknown as LevelDatabase })
  opened.push(writer)
  let appended = 0
  let applying = false
  const apply = async (): Promise<void> => { if (applying) await writer.append(STREAM, 'k', record(`more-${appended++}`)) }
  const follower = await openLogStore({ db: busy(copy, apply), follower: true })
  opened.push(follower)
  await damageBatch(copy as unknown as LevelDatabase, STREAM, 0, 50, 'delete')
  const codes: string[] = []
  for (let i = 0; i < 5; i++) {
    // The refresh is on the standby's apply chain, never beside an apply (replication/standby.ts); the reads are not.
    applying = false
    await follower.refresh()
    applying = true
    codes.push(await follower.read(STREAM, 0, 40, { maxRecords: 1000 }).then(() => 'ok', (err: { code?: string }) => err.code ?? String(err)))
  }
  expect(appended).toBeGreaterThan(0)
  expect(codes).toEqual(Array(5).fill('STORE_DAMAGED'))
})
