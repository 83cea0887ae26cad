"""Decoders by kind id, what each kind id means, and the checks of a node's JSON columns.

A load reads one integer per file, its ``kind_id`` (:mod:`.kinds`), and finds
its decoder by it. :class:`Decoders` keeps, per backend, what each kind id
means (read from ``polystore_kinds`` on the fast path, :mod:`.fast`) and the
decoder and batch decoder built for it. Ids are derived from their kinds, so
what is cached here stays true in any catalog. Single loads (:mod:`.load`),
batch loads (:mod:`.load_batch`) and reads at a snapshot share one instance.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from polystore.backends.sql import tree
from polystore.backends.sql.engine import JSONColumnError
from polystore.backends.sql.fast import FastReader, Unavailable, parse_json
from polystore.backends.sql.kinds import kinds_args, kinds_sql
from polystore.errors import CatalogDamagedError
from polystore.serializers import SHARED_ARRAY_BYTES, SerializerRegistry

__all__ = [
    "Decoders",
    "KindDef",
    "damaged_record",
    "decoder_meta",
    "json_column",
    "reading",
]

#: Decoders each backend keeps (one per distinct serializer, dtype, shape, meta).
MAX_DECODERS = 4096
# How many kinds there are (up to one more than are read whole), and the largest id.
_COUNT_KINDS = (
    f"SELECT count(*), max(id) FROM (SELECT id FROM polystore_kinds LIMIT {MAX_DECODERS + 1}) AS k"
)
#: Kinds each backend knows (what an id means: a few short strings each).
_MAX_KINDS = 1 << 16
#: The buffer external content is read into, by serializer (see
#: :meth:`.ContentReader.read`): one the built-in decoder keeps without a copy.
_BUFFERS = {"bytes": "bytes", "ndarray": "ndarray"}

Decoder = Callable[[Any], Any]


class KindDef(NamedTuple):
    """What a kind id means: a row of ``polystore_kinds`` as :func:`~.kinds.kinds_sql` reads it."""

    serializer: str
    dtype: str | None
    #: JSON text, or None.
    shape: str | None
    #: JSON text, or None.
    meta: str | None


def decoder_meta(
    meta: dict[str, object] | None, shape: object, dtype: str | None
) -> dict[str, object]:
    """What a serializer's decoder is given: its recorded meta, plus shape and dtype."""
    full = dict(meta or {})
    if shape is not None:
        full["shape"] = shape
    if dtype is not None:
        full["dtype"] = dtype
    return full


def damaged_record(path: str, what: str) -> CatalogDamagedError:
    """The error for the row of ``path`` holding ``what`` polystore never writes."""
    return CatalogDamagedError(
        f"the catalog's record of {path!r} is damaged: {what} (written by another "
        "program?); `fsck()` lists every such row, to repair or remove with SQL"
    )


#: The JSON type each JSON column of a node holds when it is not null.
_JSON_COLUMNS = {"shape": (list, "a JSON array"), "meta": (dict, "a JSON object"),
                 "attrs": (dict, "a JSON object")}  # fmt: skip


def json_column(path: str, row: Any, column: str, *, text: bool = False) -> Any:
    """Column ``column`` of ``path``'s ``row``, checked: what polystore writes, or damage.

    ``text``: the row holds the column as JSON text (:func:`~.query.run_query`),
    parsed here so that damage names its path.
    """
    value = getattr(row, column)
    if text and value is not None:
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise damaged_record(path, f"its {column} is not JSON") from exc
    kind, name = _JSON_COLUMNS[column]
    if value is not None and not isinstance(value, kind):
        raise damaged_record(path, f"its {column} is not {name}")
    return value


@contextmanager
def reading(path: str) -> Iterator[None]:
    """Name ``path`` in the error for a JSON column of its row that does not parse."""
    try:
        yield
    except JSONColumnError as exc:
        raise damaged_record(path, "its shape, meta or attrs is not JSON") from exc


class Decoders:
    """The decoders of one backend, by kind id, and what each kind id means.

    ``single`` and ``many`` (kind id -> decoder, batch decoder) and ``defs``
    (kind id -> :class:`KindDef`) are read directly on hot paths; a kind not
    known yet is read from ``polystore_kinds`` on the fast path.
    """

    def __init__(self, fast: FastReader, dialect: str) -> None:
        self._fast = fast
        self._dialect = dialect
        self.serializers = SerializerRegistry.default()
        self.allow_pickle = False
        #: Kind id -> decoder of one content.
        self.single: dict[int, Decoder] = {}
        #: Kind id -> batch decoder (a list of contents -> a list of values).
        self.many: dict[int, Callable[[Any], list[Any]]] = {}
        #: Kind id -> what it means.
        self.defs: dict[int, KindDef] = {}
        self._state: tuple[object, ...] = ()
        # (rows, largest id) of polystore_kinds when last read whole
        self._counted: tuple[object, ...] = ()

    def use(self, serializers: SerializerRegistry, allow_pickle: bool) -> None:
        """Decode with these (the backend's, as they are now); drop cached decoders if they changed."""
        state = self._state
        if (
            state
            and serializers is state[0]
            and serializers.changes == state[1]
            and allow_pickle == state[2]
        ):
            return  # (every load asks: the common case makes no tuple)
        self.serializers, self.allow_pickle = serializers, allow_pickle
        self.single.clear()
        self.many.clear()
        self._state = (serializers, serializers.changes, allow_pickle)

    def buffer(self, kind_id: int | None) -> str:
        """The buffer to read external content of kind ``kind_id`` into (:meth:`.ContentReader.content`)."""
        found = None if kind_id is None else self.defs.get(kind_id)
        return buffer_for(found.serializer if found is not None else "")

    def get(self, kind_id: int | None, many: bool) -> Decoder:
        """The decoder (``many``: batch decoder) for files of kind ``kind_id``.

        A kind not known here yet is read from ``polystore_kinds`` on this
        thread's fast-path connection. Raises :class:`~.fast.Unavailable` if it
        cannot be read: the caller takes the slow path, which decodes from the
        node's own columns (a file without a kind id was written by something
        other than polystore).
        """
        decode = self.known(kind_id, many)
        if decode is None:
            if kind_id is None:
                raise Unavailable
            self.learn([kind_id])
            decode = self.known(kind_id, many)
            if decode is None:
                raise Unavailable
        return decode

    def known(self, kind_id: int | None, many: bool) -> Decoder | None:
        """The decoder for kind ``kind_id`` if this backend knows the kind (no query).

        Decoders are cached by kind id; :meth:`use` drops them all
        when the serializers change.
        """
        if kind_id is None:
            return None
        cache: dict[int, Decoder] = self.many if many else self.single
        decode = cache.get(kind_id)
        if decode is None:
            found = self.defs.get(kind_id)
            if found is None:
                return None
            try:
                full = decoder_meta(parse_json(found.meta), parse_json(found.shape), found.dtype)
            except (ValueError, TypeError, RecursionError) as exc:
                raise CatalogDamagedError(
                    f"row {kind_id} of polystore_kinds is damaged: its shape or meta is not "
                    "the JSON polystore writes; `fsck()` lists it among the bad kinds"
                ) from exc
            build = self.serializers.batch_decoder if many else self.serializers.decoder
            decode = build(found.serializer, full, allow_pickle=self.allow_pickle)
            if len(cache) >= MAX_DECODERS:
                cache.clear()
            cache[kind_id] = decode
        return decode

    def decode_inline(self, kind_id: int, datas: list[object], size: int) -> list[object] | None:
        """The values of inline contents ``datas`` of files of kind ``kind_id``.

        One batch decoder call when every content is small (``size``, the
        largest, at most :data:`~polystore.serializers.SHARED_ARRAY_BYTES`),
        else one decoder call each, as a live batch load does. None if the
        kind cannot be read on the fast path: decode from the full rows then.
        """
        try:
            if size <= SHARED_ARRAY_BYTES:
                values: list[object] = self.get(kind_id, many=True)(datas)
                return values
            decode = self.get(kind_id, many=False)
        except Unavailable:
            return None
        return [decode(data) for data in datas]

    def refresh(self) -> None:
        """Before a stream: read the catalog's kinds if it has some this backend has not.

        The connection is busy while results stream, so the files of a kind
        met only then wait for the stream's end, holding their bytes. The
        count and largest id of ``polystore_kinds`` (in the snapshot the
        stream reads, so they cover every file it can return; counted up to
        4,097 rows, so the count costs alike in a catalog of millions) tell
        whether kinds were added since they were last read; catalogs of up to
        4,096 kinds are then read whole.
        """
        rows = self._fast.fetch_raw(_COUNT_KINDS, [])
        if rows is None:
            raise Unavailable
        seen = tuple(rows[0])
        if seen != self._counted and seen[0] <= MAX_DECODERS:
            self.learn(None)
            self._counted = seen

    def learn(self, ids: Sequence[int] | None) -> None:
        """Read kinds ``ids`` (None: every kind, up to 4,096) into :attr:`defs`.

        Raises :class:`~.fast.Unavailable` if the fast path cannot read them.
        """
        defs = self.defs
        dialect = self._dialect
        queries: list[tuple[str, list[object]]]
        if ids is None:
            queries = [(f"{kinds_sql(dialect, None)} LIMIT {MAX_DECODERS}", [])]
        else:
            queries = [
                (kinds_sql(dialect, len(part)), kinds_args(dialect, part))
                for part in tree.chunks([i for i in ids if i not in defs])
            ]
        for sql, args in queries:
            rows = self._fast.fetch_raw(sql, args)
            if rows is None:
                raise Unavailable
            if len(defs) + len(rows) > _MAX_KINDS:
                defs.clear()
            for kind_id, *definition in rows:
                defs[kind_id] = KindDef(*definition)


def buffer_for(serializer: str) -> str:
    """The buffer external content of ``serializer`` is read into (:meth:`.ContentReader.content`)."""
    return _BUFFERS.get(serializer, "bytearray")
