"""replay_store: the durable store of cl-service (tables, content-addressed blobs, ingest group commit).

It never imports cl_service: the service depends on the store, not the other way round.
"""

from replay_store.blobs import BlobStore
from replay_store.store import NewSample, Store, StoredSample

__all__ = ["BlobStore", "NewSample", "Store", "StoredSample"]
