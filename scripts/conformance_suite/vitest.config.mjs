// The suite's own timeouts (vitest's default 5 s, and longPollTimeoutMs + 1 s for the
// long-poll tests) are kept: tokentape passes it as published.
export default { test: { include: ["conformance.test.mjs"] } }
