"""Names shared by both ends of the follow protocol (GET /v1/services long-polls).

The API serves it; followers and ``dns.workers`` processes speak it. Keeping
the names here lets both sides import them without importing each other.
"""

from __future__ import annotations

# A dns.workers process names itself in this header of its long-polls, so the main
# process learns which revision each worker serves (from its If-None-Match).
WORKER_HEADER = "X-Meshdns-Worker"

# The lineage of the registry a GET /v1/services answer comes from (see
# meshdns/history.py): a follower sends it back with ?since= so that a leader
# whose revisions restarted is never asked for a delta it cannot mean.
LINEAGE_HEADER = "X-Meshdns-Lineage"

# A watch stream's answer (GET /v1/services?since=N&stream=1, meshdns/api/stream.py)
# names the seconds between its heartbeats here; a follower reads a stream as gone
# after a few of them pass in silence.
HEARTBEAT_HEADER = "X-Meshdns-Heartbeat"
