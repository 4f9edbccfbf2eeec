"""Which raw samples precompute keeps, and what caption each one gets.

img2dataset writes the metadata of every sample into its `KEY.json` (url, caption, key,
status, sizes, and the columns passed through `--save_additional_columns`, such as LAION's
`aesthetic`, `punsafe`, `pwatermark`, `similarity`) and into the shard's `NNNNN.parquet`.
`SampleFilter` reads the caption from the `txt` member or a JSON field, and applies
`data.filters` to the metadata: what it rejects is counted per reason, apart from samples
that cannot be decoded. A field missing from a sample's JSON is looked up in the parquet
beside its shard (read once per shard, only when needed).
"""

from __future__ import annotations

import json
import operator
from pathlib import PurePosixPath
from typing import Any

from core import storage
from core.config import parse_comparison
from core.errors import LdmError
from data_pipeline.images import read_shard

_OPERATORS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
NUM_SAMPLES_CHECKED = 16  # of the first shard, for fields a filter or the caption names


def parquet_beside(shard: str) -> str:
    """img2dataset's metadata table of a shard: `00012.tar` -> `00012.parquet`."""
    return storage.join(
        storage.dirname(shard), PurePosixPath(storage.basename(shard)).stem + ".parquet"
    )


def metadata_of(sample: dict) -> dict[str, Any]:
    """The sample's `KEY.json` as a dict ({} when it has none or it is not a JSON object)."""
    raw = sample.get("json")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class SampleFilter:
    """The caption and the filter verdict of each sample of one shard."""

    def __init__(self, caption: str, filters: dict[str, Any], shard: str):
        self.caption_field = caption
        self.filters = filters
        self.where = [(text, *parse_comparison(text)) for text in filters.get("where", [])]
        self.shard = shard
        self._parquet: dict[str, dict[str, Any]] | None = None

    def caption(self, sample: dict, meta: dict[str, Any]) -> str | None:
        """The caption, or None when the configured JSON field is missing or empty."""
        if self.caption_field == "txt":
            text = sample.get("txt", b"")
            return text.decode("utf-8").strip() if isinstance(text, bytes) else str(text).strip()
        value = meta.get(self.caption_field)
        text = value.strip() if isinstance(value, str) else ""
        return text or None

    def _field(self, key: str, meta: dict[str, Any], name: str) -> Any:
        if name in meta:
            return meta[name]
        if self._parquet is None:
            self._parquet = self._read_parquet()
        return self._parquet.get(key, {}).get(name)

    def _read_parquet(self) -> dict[str, dict[str, Any]]:
        path = parquet_beside(self.shard)
        if not storage.exists(path):
            return {}
        import pyarrow.parquet as pq

        names = sorted({name for _, name, _, _ in self.where})
        with storage.open_read(path) as stream:
            schema = pq.read_schema(stream)
            columns = ["key", *[n for n in names if n in schema.names]]
            if "key" not in schema.names:
                return {}
            stream.seek(0)
            table = pq.read_table(stream, columns=columns).to_pylist()
        return {str(row["key"]): row for row in table}

    def reject_metadata(self, key: str, caption: str | None, meta: dict[str, Any]) -> str | None:
        """Why the sample is filtered on its caption and metadata, or None to keep it."""
        f = self.filters
        if caption is None:
            return f"no caption ({self.caption_field})"
        if len(caption) < f.get("min_caption_length", 0):
            return f"min_caption_length {f['min_caption_length']}"
        if f.get("max_caption_length") is not None and len(caption) > f["max_caption_length"]:
            return f"max_caption_length {f['max_caption_length']}"
        for text, name, op, threshold in self.where:
            value = _number(self._field(key, meta, name))
            if value is None:
                return f"no number in {name}"
            if not _OPERATORS[op](value, threshold):
                return text
        return None

    def reject_size(self, width: int, height: int) -> str | None:
        """Why the sample is filtered on its original size, or None to keep it."""
        f = self.filters
        if width < f.get("min_width", 0):
            return f"min_width {f['min_width']}"
        if height < f.get("min_height", 0):
            return f"min_height {f['min_height']}"
        ratio = f.get("max_aspect_ratio")
        if ratio is not None and max(width, height) > ratio * min(width, height):
            return f"max_aspect_ratio {ratio:g}"
        return None


def original_size(meta: dict[str, Any], decoded: tuple[int, int]) -> tuple[int, int]:
    """(width, height) before any resizing: img2dataset's `original_width/height`, else the
    decoded image's."""
    width, height = meta.get("original_width"), meta.get("original_height")
    if _number(width) and _number(height):
        return int(width), int(height)
    return decoded


def check_fields_exist(shard: str, caption: str, filters: dict[str, Any]) -> None:
    """Refuse, before any work, a caption field or filter field that the first samples of
    `shard` and its parquet do not have (a typo would otherwise filter every sample)."""
    wanted = {parse_comparison(text)[0]: "data.filters.where" for text in filters.get("where", [])}
    if caption != "txt":
        wanted.setdefault(caption, "data.caption")
    if not wanted:
        return
    seen: set[str] = set()
    for number, sample in enumerate(read_shard(shard)):
        seen |= set(metadata_of(sample))
        if number + 1 == NUM_SAMPLES_CHECKED:
            break
    columns: list[str] = []
    path = parquet_beside(shard)
    if storage.exists(path):
        import pyarrow.parquet as pq

        with storage.open_read(path) as stream:
            columns = pq.read_schema(stream).names
    for name, key in wanted.items():
        if name not in seen and name not in columns:
            fields = ", ".join(sorted(seen | set(columns))) or "none"
            raise LdmError(
                f"{key}: no sample of {storage.basename(shard)} has a field {name!r} in its "
                f"JSON or parquet (fields there: {fields}); check the name"
            )
