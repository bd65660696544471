"""The store: generation logs, leases and jobs, and Durable Streams, on Redis; the only
code that talks to it.

- `log`: `GenerationLog`, the API the HTTP face, the hub, the workers and the
  tools call (create, append, read, lease, cancel).
- `scripts` and `lua/`: the Lua scripts, each declared once with named KEYS and ARGV.
- `transport`: how commands reach Redis (hiredis-packed, pipelined per loop tick).
- `jobs`: the job queue workers consume; `cancels`: the cancel requests they hear.
- `quotas`: what each API key may create (running generations, creations per minute).
- `retention`: TTLs, closing abandoned generations, trimming the job queue.
- `state`: what the store hands out (`GenerationState`, `Lease`, raw entries).
- `streams` and `stream_scripts`: the Durable Streams (`StreamStore`), kept beside
  generations under a hash tag of their own.
- `subscriptions` and `subscription_scripts`: their subscriptions (`SubscriptionStore`):
  cursors, wakes, the registry readers match writes against, the deliveries due.
"""

from app.store.cancels import CancelRequests
from app.store.jobs import Job, JobQueue, JobReader
from app.store.log import GenerationLog
from app.store.quotas import Admission, Quotas
from app.store.retention import Retention, Ttls
from app.store.scripts import UnexpectedReply
from app.store.state import GenerationState, Lease, RawEntry, now_ms
from app.store.streams import StreamStore

__all__ = [
    "Admission",
    "CancelRequests",
    "GenerationLog",
    "GenerationState",
    "Job",
    "JobQueue",
    "JobReader",
    "Lease",
    "Quotas",
    "RawEntry",
    "Retention",
    "StreamStore",
    "Ttls",
    "UnexpectedReply",
    "now_ms",
]
