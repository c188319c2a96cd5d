/**
 * The client side of the /v1 API for the command line: JSON requests, and
 * NDJSON responses read line by line as they arrive. API errors become
 * CliErrors with the matching CLI code; a gateway that does not answer is
 * CLI_UNREACHABLE, with the address in the message.
 */
import { CliError, cliCodeForApi } from './errors.ts'

export interface HttpTarget {
  /** Base URL of the gateway's HTTP port, e.g. http://127.0.0.1:9464. */
  readonly url: string
  readonly user?: string
  readonly password?: string
  /** A bearer token (`edgemq token`), instead of a user and password. */
  readonly token?: string
}

interface ApiErrorBody { readonly error?: { readonly code?: unknown, readonly message?: unknown, readonly position?: unknown } }

export class ApiClient {
  readonly #base: URL
  readonly #auth: string | undefined

  constructor (target: HttpTarget) {
    let base: URL
    try {
      base = new URL(target.url)
    } catch (cause) {
      throw new CliError('CLI_BAD_ARGUMENT', `--url ${JSON.stringify(target.url)} is not a URL (expected e.g. http://127.0.0.1:9464)`, { cause })
    }
    if (base.protocol !== 'http:' && base.protocol !== 'https:') throw new CliError('CLI_BAD_ARGUMENT', `--url must be http:// or https://, got ${target.url}`)
    this.#base = base
    if (target.user === undefined && target.password !== undefined) {
      throw new CliError('CLI_BAD_ARGUMENT', 'a password was given without a user (--user or EDGEMQ_USER)')
    }
    if (target.token !== undefined && target.user !== undefined) {
      throw new CliError('CLI_BAD_ARGUMENT', 'give either a token (--token or EDGEMQ_TOKEN) or a user and password, not both')
    }
    if (target.token !== undefined && !/^[A-Za-z0-9\-._~+/]+=*$/.test(target.token)) {
      throw new CliError('CLI_BAD_ARGUMENT', 'the token has characters a bearer token cannot have (expected emq_<name>_<secret>, as `edgemq token` prints it)')
    }
    this.#auth = target.token !== undefined
      ? `Bearer ${target.token}`
      : target.user === undefined ? undefined : `Basic ${Buffer.from(`${target.user}:${target.password ?? ''}`).toString('base64')}`
  }

  /** `/v1/…` path segments, each percent-encoded, with optional query parameters (arrays repeat). */
  url (segments: readonly (string | number)[], query: Readonly<Record<string, string | number | readonly string[] | undefined>> = {}): URL {
    const u = new URL(`v1/${segments.map((s) => encodeURIComponent(String(s))).join('/')}`, this.#base.href.endsWith('/') ? this.#base : `${this.#base.href}/`)
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined) continue
      if (Array.isArray(v)) for (const item of v as readonly string[]) u.searchParams.append(k, item)
      else u.searchParams.set(k, String(v))
    }
    return u
  }

  async request (url: URL, init: { method?: string, body?: unknown, signal?: AbortSignal } = {}): Promise<Response> {
    const headers: Record<string, string> = {}
    if (this.#auth !== undefined) headers.authorization = this.#auth
    let body: string | undefined
    if (init.body !== undefined) { body = JSON.stringify(init.body); headers['content-type'] = 'application/json' }
    let res: Response
    try {
      res = await fetch(url, { method: init.method ?? 'GET', headers, body, signal: init.signal })
    } catch (cause) {
      if ((cause as Error).name === 'AbortError') throw cause
      const reason = (cause as { cause?: { message?: string } }).cause?.message ?? (cause as Error).message
      throw new CliError('CLI_UNREACHABLE',
        `cannot reach the gateway at ${this.#base.origin}: ${reason} (is it running? --url sets the address; --data-dir reads a stopped gateway's data)`,
        { cause })
    }
    if (res.ok) return res
    const text = await res.text()
    let parsed: ApiErrorBody = {}
    try { parsed = JSON.parse(text) as ApiErrorBody } catch { /* not the API's error shape */ }
    const code = typeof parsed.error?.code === 'string' ? parsed.error.code : `HTTP ${res.status}`
    const message = typeof parsed.error?.message === 'string' ? parsed.error.message : text.slice(0, 200)
    throw apiFailure(code, message)
  }

  async json<T> (url: URL, init: { method?: string, body?: unknown } = {}): Promise<T> {
    const res = await this.request(url, init)
    return await res.json() as T
  }
}

export function apiFailure (code: string, message: string): CliError {
  const cliCode = cliCodeForApi(code)
  const text = cliCode === 'CLI_AUTH'
    ? `the gateway refused the credentials (${code}): ${message}; give --token (or EDGEMQ_TOKEN), or --user and --password (or EDGEMQ_USER and EDGEMQ_PASSWORD)`
    : message
  return new CliError(cliCode, cliCode === 'CLI_SERVER' ? `${code}: ${text}` : text)
}

/** The lines of an NDJSON response body, as they arrive. */
export async function * ndjsonLines (res: Response): AsyncGenerator<string> {
  if (res.body === null) return
  const decoder = new TextDecoder('utf-8')
  let buffered = ''
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    buffered += decoder.decode(chunk, { stream: true })
    let start = 0
    for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n', start)) {
      if (nl > start) yield buffered.slice(start, nl)
      start = nl + 1
    }
    buffered = buffered.slice(start)
  }
  buffered += decoder.decode()
  if (buffered.length > 0) yield buffered
}
