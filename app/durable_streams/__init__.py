"""Durable Streams: the open HTTP protocol for offset-addressed, resumable streams, on Redis.

`protocol` parses and formats what the wire carries (offsets, headers, JSON mode,
SSE events), `errors` are its refusals with the headers a client acts on, `sources`
reads stored streams and generations alike. Streams are kept by the store
(`app.store.streams`); the hub's `StreamNotifier` wakes the requests waiting for the
next append; the routes are in `app.http.durable_streams`. docs/durable-streams.md
says what is supported.
"""
