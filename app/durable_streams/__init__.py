"""Durable Streams: the open HTTP protocol for offset-addressed, resumable streams, on Redis.

`protocol` parses and formats what the wire carries (offsets, headers, JSON mode,
SSE events), `errors` are its refusals with the headers a client acts on, `sources`
reads stored streams and generations alike. `subscriptions` are the protocol's
subscriptions, `webhooks` where their webhooks may go and how they are signed, and
`delivery` runs them in a reader. Streams and subscriptions are kept by the store
(`app.store.streams`, `app.store.subscriptions`); the hub's `StreamNotifier` wakes the
requests waiting for the next append; the routes are in `app.http.durable_streams`.
docs/durable-streams.md says what is supported.
"""
