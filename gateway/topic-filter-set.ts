/**
 * Many MQTT topic filters compiled into one matcher: a trie of filter
 * levels, walked once per topic. Matching each filter in turn
 * (`filters.some(f => topicMatches(f, topic))`) splits the topic once per
 * filter; with a thousand filters over 20,000 records that was 22 million
 * splits. Same rules as topicMatches (topics.ts): `+` one level, `#` the rest
 * including the parent level, and no leading wildcard matches a `$` topic
 * [MQTT-4.7.2-1]. Pure.
 */

interface Node {
  readonly children: Map<string, Node>
  plus: Node | null
  /** A filter ends here with `#`. */
  hash: boolean
  /** A filter ends exactly here. */
  end: boolean
}

function node (): Node {
  return { children: new Map(), plus: null, hash: false, end: false }
}

function matches (n: Node, levels: readonly string[], i: number, root: boolean): boolean {
  // [MQTT-4.7.2-1] a `$` topic is not matched by a filter starting with a wildcard.
  const wild = !(root && (levels[0] as string).startsWith('$'))
  if (n.hash && wild) return true
  if (i === levels.length) return n.end
  const child = n.children.get(levels[i] as string)
  if (child !== undefined && matches(child, levels, i + 1, false)) return true
  return n.plus !== null && wild && matches(n.plus, levels, i + 1, false)
}

function add (root: Node, filter: string): void {
  let n = root
  for (const level of filter.split('/')) {
    if (level === '#') { n.hash = true; return } // valid filters have `#` last only
    if (level === '+') n = n.plus ??= node()
    else {
      let next = n.children.get(level)
      if (next === undefined) n.children.set(level, next = node())
      n = next
    }
  }
  n.end = true
}

/** A predicate that holds when the topic matches at least one of the (valid) filters. */
export function compileTopicFilters (filters: readonly string[]): (topic: string) => boolean {
  const root = node()
  for (const filter of filters) add(root, filter)
  return (topic) => matches(root, topic.split('/'), 0, true)
}
