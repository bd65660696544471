"""Per-process fan-out of generation logs to SSE clients.

One pub/sub connection per process (`pubsub`; on a Redis Cluster one per primary)
carries the live batches of every generation that has a reader here; all readers
of one generation share one `Feed` (`fanout`). A `Subscription` (`subscription`)
is one client: it catches up from the log in pages, then takes live batches from
its feed. The channel is subscribed before the log is read, so nothing falls
between the two; live batches that arrive during a read are kept and take over
when they continue the page. A GET reads its first page beside the log's state,
before it subscribes (`Hub.first_page`), and hands it out first. A create subscribes
the new generation's channel ahead of its reader (`Hub.listen_ahead`); a feed with no
subscription keeps the last live batches it heard, and offers them to the next
subscription made. A page read under a confirmed channel is caught up when every
batch heard after its read was offered to the subscription; otherwise the log is
read again once the channel is confirmed.
Delivery is exactly-once and in order because every subscription tracks the last
seq it handed out and falls back to the log whenever live delivery cannot be
trusted:

- a live batch that starts after the next expected seq (pub/sub is at-most-once:
  a message was missed) -> back-fill from the log;
- more than `client_buffer_events` pending for a slow client -> drop the buffer
  and read from the log at the client's pace (the log is durable; memory stays
  bounded);
- the pub/sub connection dropped, a live message could not be parsed, or a feed
  has been silent for a while -> every affected subscription re-checks the log.

Each live event is framed once, straight from the published message
(`app.sse.live_frames`), and its bytes are shared by every subscription that
receives it; catch-up pages are framed straight from the XRANGE reply
(`app.sse.event_frames`).

A caught-up event stream does not wake its task for a live batch: its subscription
holds a `Sink` (the stream's connection), and the hub writes every batch that came
in one read of the pub/sub connection to it in one write (`Hub.flush_soon`). The task
writes only what needs more than a write: catch-up pages, a client that is behind, a
heartbeat, the terminal batch and the stream's end. A round of these writes that took
t (thousands of clients of one generation) holds the next round back for t, 50 ms at
most: live writes take at most half of the loop, and what arrives in the pause goes
out with the next round, one write per client.

The same connection wakes the requests that wait for a Durable Stream's next write
(`notifier`): they watch its channel, and any message on it means "read again".
"""

from app.hub.fanout import Feed, Hub
from app.hub.notifier import StreamNotifier, Watch
from app.hub.subscription import Page, Subscription

__all__ = ["Feed", "Hub", "Page", "StreamNotifier", "Subscription", "Watch"]
