"""JSON arrays read lazily: a byte-offset index of the top-level elements, records read by offset.

Owns ``.json`` files holding one ``[...]`` array (LLaVA-665K, ShareGPT4V, Long-VITA's JSONs, ...:
often 1 GB+). One pass over the file records ``(start, end)`` byte offsets of every element;
the index is a flat int64 file, memory-mapped, so neither indexing nor training ever holds the
array as Python objects: a rank reads exactly the bytes of the records it asks for.

    arr = JsonArray(path)        # builds or loads the index
    len(arr); arr.read(k)        # -> the parsed k-th element (or a JSONDecodeError)

The index is cached beside the data file as ``.NAME.lvita-index`` (or, when that folder is not
writable, under ``$LVITA_CACHE_DIR`` / ``~/.cache/lvita/index``), with the data file's size and
mtime in its header: a changed file is re-indexed. It is written to a temporary file and renamed,
and built under an exclusive ``flock`` of ``INDEX.lock``: when many ranks start at once one scans
the file and the others wait and load its index (its content is rank-independent); none ever reads
a half-written one, even where locks do not work and each builds its own.

Trade-offs: indexing parses every element with the C JSON decoder (memory: one element and an 8 MB
read buffer; speed: see BENCHMARKS.md) instead of a hand-written scanner, so a malformed element
is an error for the whole file (a broken download), not a skipped sample; an element larger than
``MAX_ELEMENT`` bytes is refused.
"""
from __future__ import annotations

import codecs
import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from lvita.data.errors import DataError

MAGIC = b"LVIDX01\0"
HEADER = 32  # magic, size, mtime_ns, count: 4 x 8 bytes
CHUNK = 8 << 20
MAX_ELEMENT = 256 << 20
_WS = re.compile(r"[ \t\n\r]*")


class JsonArrayError(DataError):
    """The file is not a readable JSON array; the message names the file and the byte."""


def is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")
    return head.startswith(b"[")


def index_path(path: Path) -> Path:
    path = Path(path).resolve()
    if os.access(path.parent, os.W_OK) and not os.environ.get("LVITA_CACHE_DIR"):
        return path.parent / f".{path.name}.lvita-index"
    cache = Path(os.environ.get("LVITA_CACHE_DIR") or Path.home() / ".cache" / "lvita") / "index"
    return cache / f"{hashlib.sha1(str(path).encode()).hexdigest()[:16]}-{path.name}.lvita-index"


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def load_index(path: Path) -> np.ndarray | None:
    """The cached (n, 2) offsets, memory-mapped, or None when missing or stale."""
    ip = index_path(path)
    try:
        with open(ip, "rb") as f:
            head = f.read(HEADER)
    except OSError:
        return None
    if len(head) != HEADER or head[:8] != MAGIC:
        return None
    size, mtime, count = np.frombuffer(head[8:], dtype="<i8").tolist()
    if (size, mtime) != _stamp(path) or os.path.getsize(ip) != HEADER + 16 * count:
        return None
    if count == 0:
        return np.zeros((0, 2), dtype="<i8")
    return np.memmap(ip, dtype="<i8", mode="r", offset=HEADER, shape=(count, 2))


def build_index(path: Path) -> np.ndarray:
    """Scan the array once and write its index atomically; returns the memory-mapped index."""
    path = Path(path)
    ip = index_path(path)
    ip.parent.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(path)
    fd, tmp = tempfile.mkstemp(dir=ip.parent, prefix=ip.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(b"\0" * HEADER)
            count = 0
            batch: list[int] = []
            for start, end in scan(path):
                batch += (start, end)
                if len(batch) >= 1 << 16:
                    out.write(np.asarray(batch, dtype="<i8").tobytes())
                    count, batch = count + len(batch) // 2, []
            out.write(np.asarray(batch, dtype="<i8").tobytes())
            count += len(batch) // 2
            out.seek(0)
            out.write(MAGIC + np.asarray([*stamp, count], dtype="<i8").tobytes())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, ip)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    index = load_index(path)
    if index is None:
        raise JsonArrayError(f"{path} changed while it was being indexed; run again")
    return index


def scan(path: Path):
    """Yield ``(start, end)`` byte offsets of each top-level element of the array in ``path``."""
    dec = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, pos, bpos, eof, ascii_ = "", 0, 0, False, True  # buf[pos] is at byte bpos

        def refill() -> bool:
            nonlocal buf, pos, eof, ascii_
            if eof:
                return False
            raw = f.read(CHUNK)
            eof = not raw
            try:
                text = utf8.decode(raw, final=eof)
            except UnicodeDecodeError as e:  # a JsonArrayError naming the byte, not a bare UnicodeDecodeError
                raise JsonArrayError(f"{path}: not valid UTF-8 near byte {f.tell() - len(raw) + e.start}; "
                                     f"re-download the file or convert it to JSON lines") from None
            buf, pos = buf[pos:] + text, 0
            ascii_ = buf.isascii()
            return bool(text) or not eof

        def advance(to: int) -> None:
            nonlocal pos, bpos
            bpos += (to - pos) if ascii_ else len(buf[pos:to].encode("utf-8"))
            pos = to

        def skip_ws() -> str:
            while True:
                advance(_WS.match(buf, pos).end())
                if pos < len(buf):
                    return buf[pos]
                if not refill():
                    return ""

        def fail(what: str) -> JsonArrayError:
            return JsonArrayError(f"{path}: not a valid JSON array: {what} at byte {bpos}; re-download the file "
                                  f"or convert it to JSON lines")

        refill()
        if buf.startswith("\ufeff"):
            buf, bpos = buf[1:], 3
        if skip_ws() != "[":
            raise fail("expected '['")
        advance(pos + 1)
        if skip_ws() == "]":
            return
        while True:
            if skip_ws() == "":
                raise fail("the file ends inside the array")
            while True:
                try:
                    _, end = dec.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as e:
                    if eof or len(buf) - pos > MAX_ELEMENT:
                        raise fail(f"{e.msg} (or an element over {MAX_ELEMENT >> 20} MB)") from None
                except RecursionError:  # [[[[...]]]] deeper than the decoder's recursion limit
                    raise fail("an element nested too deeply to parse") from None
                refill()  # the element may continue in the next chunk: parse it again with more text
            start = bpos
            advance(end)
            yield start, bpos
            c = skip_ws()
            if c == "]":
                return
            if c != ",":
                raise fail(f"expected ',' or ']' after an element, got {c!r}" if c
                           else "the file ends inside the array")
            advance(pos + 1)


@contextlib.contextmanager
def _build_lock(ip: Path):
    """An exclusive ``flock`` on ``INDEX.lock`` while building. Where locks are unsupported (some
    network filesystems) every rank builds its own copy: still correct, thanks to the atomic rename."""
    ip.parent.mkdir(parents=True, exist_ok=True)
    try:
        f = open(ip.with_name(ip.name + ".lock"), "a")
        fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


class JsonArray:
    rows = True  # record k is addressable (cursor = element index)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.index = load_index(self.path)
        if self.index is None:
            with _build_lock(index_path(self.path)):  # one builder; the others wait, then load its index
                self.index = load_index(self.path)
                if self.index is None:
                    self.index = build_index(self.path)
        self._f = None

    def __len__(self) -> int:
        return len(self.index)

    def reopen(self) -> "JsonArray":
        other = object.__new__(JsonArray)
        other.path, other.index, other._f = self.path, self.index, None
        return other

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def read(self, k: int):
        start, end = (int(x) for x in self.index[k])
        if self._f is None:
            self._f = open(self.path, "rb")
        self._f.seek(start)
        try:
            return json.loads(self._f.read(end - start))
        except json.JSONDecodeError as e:
            return e
