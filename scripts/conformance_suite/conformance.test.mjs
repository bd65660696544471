// The 0.3.6 CLI finds no test files: the suite runs from this file instead.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

runConformanceTests({
  baseUrl: process.env.CONFORMANCE_BASE_URL,
  longPollTimeoutMs: Number(process.env.CONFORMANCE_LONG_POLL_MS),
  // The reserved subscription APIs: webhook and pull-wake subscriptions.
  subscriptions: true,
})
