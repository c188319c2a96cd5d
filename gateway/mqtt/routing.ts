/**
 * Routing rules: which stream a published topic goes to, and which topic
 * level is its partition key. Pure; compiled once from the frozen config.
 */
import type { RouteConfig } from '../config/config.ts'
import { topicMatches } from '../access/topics.ts'

export interface Route {
  /** Stream name within the tenant (the store's stream is `<tenant>/<stream>`). */
  readonly stream: string
  /** Partition key: the topic level the route names (normally the device id). */
  readonly key: string
}

export type Router = (topic: string) => Route | null

export function compileRoutes (routes: readonly RouteConfig[]): Router {
  return (topic) => {
    for (const r of routes) {
      if (topicMatches(r.filter, topic)) {
        const key = topic.split('/')[r.keyLevel]
        if (key !== undefined && key !== '') return { stream: r.stream, key }
      }
    }
    return null
  }
}
