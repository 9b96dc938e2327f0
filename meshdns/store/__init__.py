"""The registry store: the live registry, its state file (snapshot + journal), metrics.

``store.py`` applies writes, persists and publishes them; ``statefile.py`` is the
snapshot format (and the seed file); ``journal.py`` the appended change lines;
``records.py`` what both write; ``metrics.py`` the store's Prometheus families.
"""

from .journal import Journal, journal_entry, journal_path, replay_journal
from .records import StateError, StateWriteError, fast_ip4, fast_ip6, service_record
from .statefile import load_seed, read_state, read_state_file, state_document, write_state
from .store import RegistryStore

__all__ = [
    "Journal", "RegistryStore", "StateError", "StateWriteError", "fast_ip4", "fast_ip6",
    "journal_entry", "journal_path", "load_seed", "read_state", "read_state_file",
    "replay_journal", "service_record", "state_document", "write_state",
]
