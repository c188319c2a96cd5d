/**
 * The command-line flags every bench reads: `--name=value` after the bench's
 * name (`npm run bench -- <bench> -- --records=100000`), `--quick` and the
 * like as plain words.
 */

/** The bench's own arguments. */
export const argv: readonly string[] = process.argv.slice(2)

/** The value of `--name=value`, if given. */
export function flag (name: string): string | undefined {
  return argv.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3)
}

/** An integer flag (or, when it is not given, the environment variable `env`), at least `min` (default 1). */
export function intFlag (name: string, fallback: number, options: { readonly min?: number, readonly env?: string } = {}): number {
  const min = options.min ?? 1
  const raw = flag(name) ?? (options.env === undefined ? undefined : process.env[options.env])
  const n = raw === undefined || raw === '' ? fallback : Number(raw)
  if (!Number.isSafeInteger(n) || n < min) throw new Error(`--${name} must be an integer >= ${min}`)
  return n
}
