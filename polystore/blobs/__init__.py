"""External blob stores for content too large for the catalog's own table.

These modules know nothing of SQL: the catalog decides what is stored where and
when an object may go; a store only keeps immutable objects named by their
hash. See :mod:`polystore.blobs.base` for the interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from polystore.blobs.base import (
    OWNER_KEY,
    BlobReader,
    BlobStore,
    BytesReader,
    Staging,
    StoredObject,
    StoreOwner,
    from_url,
    hash_key,
)
from polystore.blobs.local import LocalBlobStore

if TYPE_CHECKING:
    from polystore.blobs.s3 import S3BlobStore

__all__ = [
    "OWNER_KEY",
    "BlobReader",
    "BlobStore",
    "BytesReader",
    "LocalBlobStore",
    "S3BlobStore",
    "Staging",
    "StoreOwner",
    "StoredObject",
    "from_url",
    "hash_key",
]


def __getattr__(name: str) -> Any:
    # The S3 module is light, but keep it (and with it any thought of obstore)
    # out of the import of polystore.blobs.
    if name == "S3BlobStore":
        from polystore.blobs.s3 import S3BlobStore

        return S3BlobStore
    raise AttributeError(f"module 'polystore.blobs' has no attribute {name!r}")
