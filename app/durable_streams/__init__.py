"""Durable Streams: the open HTTP protocol for offset-addressed, resumable streams, on Redis.

`protocol` parses and formats what the wire carries (offsets, headers, JSON mode,
SSE events), `store` keeps streams in Redis (one hash tag per stream, a Lua script
per atomic write), `sources` reads stored streams and generations alike, `notifier`
wakes readers waiting for the next append. The routes are in `app.http.durable_streams`;
docs/durable-streams.md says what is supported.
"""
