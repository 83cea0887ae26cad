"""``S3BlobStore``: content-addressed objects in an S3-compatible bucket.

The client is `obstore <https://developmentseed.org/obstore/>`_, Python bindings
to the Rust ``object_store`` crate (the Apache Arrow project's). Why it and not
fsspec/s3fs or boto3:

* It streams: uploads from an iterator of buffers become multipart uploads with
  bounded memory, and downloads come back as a chunked stream, so a large array
  never needs a second copy in memory.
* It is synchronous and self-contained: one wheel, no ``aiobotocore`` pinned to
  an exact ``botocore``, no event loop to manage.
* Every S3 dialect it knows (AWS, MinIO, Ceph, R2, moto...) takes the same
  configuration, including the standard ``AWS_*`` environment variables.

obstore is an optional dependency (``pip install polystore[s3]``) and is imported
only when an S3 store is built, so ``import polystore`` stays light.

Keys are ``<prefix>/ab/<hash>``. Uploads are atomic on the server: a single
PUT for small objects, a multipart upload (parts of :data:`CHUNK_SIZE`) for
large ones. A writer killed during a multipart upload leaves invisible parts
behind that only the bucket's ``AbortIncompleteMultipartUpload`` lifecycle rule
removes; configure one (see ``docs/blob-stores.rst``).

The owner marker is ``<prefix>/polystore-owner.json``, created with a
conditional PUT (``If-None-Match: *``, obstore's ``mode="create"``), which AWS
S3, MinIO, R2 and moto honour: of two clients claiming a fresh prefix at once,
the server lets exactly one write it. The marker is read back after the PUT,
so a server that ignored the condition is caught unless its two writers also
read back before either overwrote the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from polystore.blobs.base import (
    CHUNK_SIZE,
    OWNER_KEY,
    BlobReader,
    BlobStore,
    Buffer,
    StoredObject,
    check_hash,
    check_range,
    hash_key,
)
from polystore.errors import BackendConfigError, BackendUnavailableError, NotFoundError

if TYPE_CHECKING:
    from obstore.store import S3Store

__all__ = ["S3BlobStore"]

#: Options that go into obstore's ``S3Config`` when given to :class:`S3BlobStore`.
_CONFIG_KEYS = (
    "endpoint",
    "region",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "virtual_hosted_style_request",
    "skip_signature",
)


def _default_name(bucket: str, prefix: str) -> str:
    name = f"s3://{bucket}/{prefix}".rstrip("/")
    if len(name) <= 64:
        return name
    # Too long for the catalog's column: keep the start, make the end unique.
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    return f"{name[:51]}~{digest}"


class _StreamReader(BlobReader):
    def __init__(self, result: Any) -> None:
        super().__init__()
        self.size = int(result.meta["size"])
        self._stream = iter(result.stream(min_chunk_size=CHUNK_SIZE))
        self._pending = memoryview(b"")

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        if not self._pending.nbytes:
            try:
                with _translate("reading from"):
                    self._pending = memoryview(next(self._stream))
            except StopIteration:
                return 0
        n = min(out.nbytes, self._pending.nbytes)
        out[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def readall(self) -> bytes:
        chunks = [bytes(self._pending)]
        with _translate("reading from"):
            chunks.extend(self._stream)
        self._pending = memoryview(b"")
        return b"".join(chunks)


@contextmanager
def _translate(action: str, store: str = "S3") -> Iterator[None]:
    """obstore's errors, at this one boundary, become polystore's."""
    from obstore.exceptions import BaseError

    try:
        yield
    except FileNotFoundError:
        raise
    except BaseError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "builder error" in first and "http://" in first:
            # reqwest refuses a plain-HTTP URL unless told to allow it.
            first += (
                " (the endpoint is plain http://: allow it with allow_http=true, as in "
                "s3://bucket/prefix?endpoint=http://host:port&allow_http=true)"
            )
        raise BackendUnavailableError(f"error {action} blob store {store}: {first}") from exc


class S3BlobStore(BlobStore):
    """Objects in ``bucket`` under ``prefix``, on AWS S3 or any S3-compatible server.

    Configuration comes from the keyword arguments and, for anything not
    given, from the usual ``AWS_*`` environment variables (``AWS_ENDPOINT_URL``,
    ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``...). ``allow_http=True`` permits a
    plain-HTTP endpoint (a local MinIO or moto server). ``part_size`` is the
    size of a multipart upload's parts (default 8 MiB, at least 5 MiB); S3 allows
    10,000 parts, so it bounds the largest object (78 GiB by default). ``config``
    and ``client_options`` pass further settings to obstore's ``S3Store`` as
    they are. The bucket must exist.
    """

    records_owner = True

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        name: str | None = None,
        allow_http: bool = False,
        part_size: int = CHUNK_SIZE,
        config: dict[str, Any] | None = None,
        client_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        try:
            from obstore.store import S3Store
        except ImportError as exc:  # pragma: no cover - obstore is installed in tests
            raise BackendConfigError(
                "S3 blob stores need obstore: pip install 'polystore[s3]'"
            ) from exc
        unknown = set(options) - set(_CONFIG_KEYS)
        if unknown:
            raise BackendConfigError(
                f"unknown S3 blob store options: {', '.join(sorted(unknown))} "
                f"(known: {', '.join(_CONFIG_KEYS)}, allow_http, part_size, name, config, "
                "client_options)"
            )
        self.part_size = int(part_size)
        if self.part_size < 5 << 20:
            raise BackendConfigError(f"S3 multipart parts are at least 5 MiB, not {part_size}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.name = name or _default_name(bucket, self.prefix)
        if len(self.name) > 64 or self.name == "inline":
            raise ValueError(
                f"a blob store name is 1-64 characters and not 'inline': {self.name!r}"
            )
        s3_config = dict(config or {}) | options
        client = dict(client_options or {})
        if allow_http:
            client["allow_http"] = True
        with _translate("configuring", self.name):
            self._store: S3Store = S3Store(
                bucket,
                prefix=self.prefix or None,
                config=s3_config,  # type: ignore[arg-type]
                client_options=client,  # type: ignore[arg-type]
            )

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r}, name={self.name!r})"

    def where(self) -> str:
        # docstring inherited
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def put(
        self, content_hash: str, chunks: Iterable[Buffer], size: int, *, token: str | None = None
    ) -> bool:
        # docstring inherited
        if self.size(content_hash) == size:
            return False
        self._write(content_hash, chunks, size)
        return True

    def replace(
        self, content_hash: str, chunks: Iterable[Buffer], size: int, *, token: str | None = None
    ) -> None:
        # docstring inherited (a PUT replaces the object atomically on the server)
        self._write(content_hash, chunks, size)

    def _write(self, content_hash: str, chunks: Iterable[Buffer], size: int) -> None:
        import obstore

        key = hash_key(content_hash)
        counted = 0

        def counting() -> Iterator[Buffer]:
            nonlocal counted
            for chunk in chunks:
                counted += memoryview(chunk).nbytes
                yield chunk

        with _translate("writing to", self.name):
            try:
                if size <= self.part_size:
                    # One PUT: small content needs no multipart bookkeeping.
                    data = b"".join(counting())
                    if counted == size:
                        obstore.put(self._store, key, data, use_multipart=False)
                else:
                    obstore.put(
                        self._store, key, counting(), chunk_size=self.part_size, max_concurrency=4
                    )
            except FileNotFoundError as exc:
                raise BackendUnavailableError(
                    f"cannot write to blob store {self.name}: {str(exc).splitlines()[0]} "
                    "(does the bucket exist?)"
                ) from exc
        if counted != size:
            if size > self.part_size:
                self.delete([content_hash])
            raise ValueError(f"upload of {content_hash} gave {counted} bytes, not {size}")

    def open(self, content_hash: str) -> BlobReader:
        # docstring inherited
        import obstore

        try:
            with _translate("reading from", self.name):
                result = obstore.get(self._store, hash_key(content_hash))
        except FileNotFoundError:
            raise NotFoundError(f"no object for blob {content_hash} in {self.name}") from None
        return _StreamReader(result)

    def read_range(self, content_hash: str, start: int, end: int) -> bytes:
        # docstring inherited: one ranged GET, only the range crosses the network
        import obstore

        check_range(start, end)
        if start == end:  # (S3 has no empty range)
            if self.size(content_hash) is None:
                raise NotFoundError(f"no object for blob {content_hash} in {self.name}")
            return b""
        try:
            with _translate("reading from", self.name):
                data = obstore.get_range(self._store, hash_key(content_hash), start=start, end=end)
        except FileNotFoundError:
            raise NotFoundError(f"no object for blob {content_hash} in {self.name}") from None
        except BackendUnavailableError:
            # A range that starts at or past the end is an error on S3 (416), and
            # no bytes here; anything else is the store's trouble.
            size = self.size(content_hash)
            if size is not None and start >= size:
                return b""
            raise
        return bytes(data)

    def size(self, content_hash: str) -> int | None:
        # docstring inherited
        import obstore

        try:
            with _translate("reading from", self.name):
                return int(obstore.head(self._store, hash_key(content_hash))["size"])
        except FileNotFoundError:
            return None

    def delete(self, content_hashes: Iterable[str]) -> None:
        # docstring inherited
        import obstore

        keys = [hash_key(h) for h in content_hashes]
        # DeleteObjects takes at most 1000 keys per request.
        for start in range(0, len(keys), 1000):
            with _translate("deleting from", self.name):
                obstore.delete(self._store, keys[start : start + 1000])

    def read_marker(self) -> bytes | None:
        # docstring inherited
        import obstore

        try:
            with _translate("reading from", self.name):
                return bytes(obstore.get(self._store, OWNER_KEY).bytes())
        except FileNotFoundError:
            return None

    def create_marker(self, data: bytes) -> bool:
        # docstring inherited
        import obstore
        from obstore.exceptions import AlreadyExistsError, PermissionDeniedError

        try:
            with _translate("writing to", self.name):
                try:
                    obstore.put(self._store, OWNER_KEY, data, mode="create", use_multipart=False)
                except AlreadyExistsError:
                    return False
                except PermissionDeniedError as exc:
                    raise PermissionError(
                        f"blob store {self.name} cannot be written: {str(exc).splitlines()[0]}"
                    ) from exc
        except FileNotFoundError as exc:
            raise BackendUnavailableError(
                f"cannot write to blob store {self.name}: {str(exc).splitlines()[0]} "
                "(does the bucket exist?)"
            ) from exc
        return self.read_marker() == data

    def scan(self) -> Iterator[StoredObject]:
        # docstring inherited
        import obstore

        with _translate("listing", self.name):
            for batch in obstore.list(self._store, chunk_size=1000):
                for meta in batch:
                    key = str(meta["path"])
                    if key == OWNER_KEY:
                        continue  # the owner marker, not an object
                    name = key.rpartition("/")[2]
                    content_hash: str | None
                    try:
                        content_hash = check_hash(name)
                    except ValueError:
                        content_hash = None
                    if content_hash is not None and hash_key(content_hash) != key:
                        content_hash = None
                    yield StoredObject(key, int(meta["size"]), content_hash)
