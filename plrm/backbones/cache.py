"""On-disk feature cache of the frozen-encoder backbone: each unique text is encoded once, then reused.

A cache is a directory ``root/<key>/`` where ``<key>`` is a short hash of the canonical JSON of a *namespace*
(model, revision, pooling, max length, storage dtype, ... whatever decides the features). It holds:

- ``namespace.json``: the namespace, for people (written atomically; checked against the key on open);
- ``shard-<time_ns>-<pid>-<uuid>.safetensors``: immutable shards, each with two tensors, ``hashes`` (n, 2) uint64
  (:func:`text_hashes` of the texts) and ``features`` (n, D) in the namespace's dtype (float32, float16 or
  bfloat16), plus the namespace key in the safetensors metadata;
- ``.shard-*.safetensors.tmp``: shards being written (or left by a crash); readers never look at them.

Writers never modify a shard: a new shard is written to a temporary file in the same directory, flushed and
fsynced, then renamed into place (``os.replace``, atomic on POSIX and Windows), so a reader sees whole shards or
none, and a crash loses at most the shard being written. Shard names are unique across processes, so several
runs may fill one cache at the same time; a text computed by two of them is stored twice and read once.

Corrupt shards (truncated, partial copies, not safetensors) are skipped with a warning naming the file: their
texts are computed again and stored in a new shard. A shard whose feature dimension differs from the others,
or that carries another namespace's key, is an error naming the file, since reading it would be silently wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

KEY_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8")])  # one 128-bit text hash; sorts like the digest bytes
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
_FILE_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # safetensors dtype -> numpy dtype of the raw bytes
_MAX_HEADER = 100 * 2**20
_FORMAT = "plrm-feature-cache/1"


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """(N, 2) uint64 hashes of ``texts``: the 16-byte blake2b digest of each UTF-8 text as two big-endian words.

    Row ``i`` is ``[int.from_bytes(d[:8], 'big'), int.from_bytes(d[8:], 'big')]`` with
    ``d = hashlib.blake2b(texts[i].encode('utf-8'), digest_size=16).digest()``: the same on every process and
    machine. Lone surrogates (invalid UTF-8) are hashed with ``surrogatepass`` instead of failing.
    """
    digests = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text_hashes: texts[{i}] is {type(text).__name__}, not str")
        digests.append(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    return np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64).reshape(len(digests), 2)


def _keys(hashes) -> np.ndarray:
    """(N,) KEY_DTYPE view of (N, 2) uint64 hashes (copied to contiguous native uint64 first)."""
    h = np.asarray(hashes)
    if h.ndim != 2 or h.shape[1] != 2 or h.dtype != np.uint64:
        raise ValueError(f"hashes must be an (N, 2) uint64 array from text_hashes, got {h.dtype} {h.shape}")
    return np.ascontiguousarray(h, dtype="<u8").view(KEY_DTYPE).reshape(len(h))


def _hashes(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys).view("<u8").reshape(len(keys), 2).astype(np.uint64)


def canonical_json(namespace: dict) -> str:
    """The namespace as JSON with sorted keys and no whitespace: equal dicts give equal strings."""
    if not isinstance(namespace, dict):
        raise TypeError(f"namespace must be a dict, got {type(namespace).__name__}")
    try:
        return json.dumps(namespace, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"namespace must be JSON-serializable (str keys, no NaN): {e}") from None


def namespace_key(namespace: dict) -> str:
    """16 hex characters naming the cache directory of ``namespace``."""
    return hashlib.blake2b(canonical_json(namespace).encode("utf-8"), digest_size=8).hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a hidden temporary file next to ``path``, fsync it, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _CorruptShard(Exception):
    pass


class _Shard:
    """One shard file: its validated header, and its tensors memory-mapped on first use."""

    def __init__(self, path: Path, key: str):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _CorruptShard(f"{size} bytes, shorter than the safetensors header length")
            n_header = int.from_bytes(raw, "little")
            if n_header > min(size - 8, _MAX_HEADER):
                raise _CorruptShard(f"header length {n_header} does not fit in the file's {size} bytes")
            try:
                header = json.loads(f.read(n_header))
            except ValueError as e:
                raise _CorruptShard(f"unreadable header ({e})") from None
        if not isinstance(header, dict):
            raise _CorruptShard("header is not a JSON object")
        self.data_start = 8 + n_header
        self.meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
        h = self._tensor(header, "hashes", {"U64": "<u8"}, size)
        f = self._tensor(header, "features", _FILE_DTYPES, size)
        (n, two), (n_f, dim) = h["shape"], f["shape"]
        if two != 2 or n_f != n or dim < 1:
            raise _CorruptShard(f"shapes hashes {h['shape']} / features {f['shape']} do not match (n, 2) / (n, D)")
        self.n, self.dim, self.file_dtype = n, dim, f["dtype"]
        self._h, self._f = h, f
        self._features = None
        if self.meta.get("namespace_key", key) != key:
            raise ValueError(f"feature cache shard {path} belongs to namespace {self.meta['namespace_key']}, "
                             f"not {key} (its directory): it was copied into the wrong cache; move or delete it")

    def _tensor(self, header: dict, name: str, dtypes: dict, size: int) -> dict:
        t = header.get(name)
        if not isinstance(t, dict) or t.get("dtype") not in dtypes:
            raise _CorruptShard(f"no tensor {name!r} of dtype {'/'.join(dtypes)}")
        try:
            shape = [int(x) for x in t["shape"]]
            begin, end = (int(x) for x in t["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _CorruptShard(f"tensor {name!r} has no valid shape / data_offsets") from None
        if len(shape) != 2 or min(shape) < 0 or begin < 0 or \
                end - begin != math.prod(shape) * np.dtype(dtypes[t["dtype"]]).itemsize:
            raise _CorruptShard(f"tensor {name!r} has shape {shape} but {end - begin} bytes")
        if self.data_start + end > size:
            raise _CorruptShard(f"truncated: tensor {name!r} ends at byte {self.data_start + end}, "
                                f"the file has {size}")
        return {"dtype": t["dtype"], "shape": shape, "data_offsets": (begin, end), "np": dtypes[t["dtype"]]}

    def _map(self, t: dict) -> np.ndarray:
        if t["shape"][0] == 0:
            return np.zeros(t["shape"], dtype=t["np"])
        return np.memmap(self.path, dtype=t["np"], mode="r", offset=self.data_start + t["data_offsets"][0],
                         shape=tuple(t["shape"]))

    def keys(self) -> np.ndarray:
        return _keys(np.array(self._map(self._h), dtype=np.uint64))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), D) features of these rows."""
        if self._features is None:
            self._features = self._map(self._f)
        return _to_float32(np.asarray(self._features[rows]), self.file_dtype)

    def close(self) -> None:
        self._features = None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _to_float32(raw: np.ndarray, file_dtype: str) -> np.ndarray:
    if file_dtype == "BF16":  # bfloat16 is the upper half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if file_dtype == "F16":
        return torch.from_numpy(raw).float().numpy()  # several times faster than numpy's float16 cast
    return raw.astype(np.float32)


class FeatureCache:
    """Features of texts under one namespace, stored once per unique text in safetensors shards under ``root``.

    ``namespace`` is a JSON-able dict of everything that decides the features, e.g. ``{"model": ...,
    "revision": ..., "pooling": "mean", "max_length": 256, "normalize": True, "dtype": "float32"}``. ``dtype``
    (the storage dtype: float32, float16 or bfloat16) defaults to float32 and is filled in before hashing, so
    leaving it out and writing ``"float32"`` name the same cache. Two different namespaces never share a
    directory. The index of stored hashes is built on first use and picks up shards written by other
    processes at each :meth:`get_or_compute` / :meth:`append` (or :meth:`refresh`).
    """

    def __init__(self, root: str | Path, namespace: dict):
        namespace = dict(namespace)
        namespace.setdefault("dtype", "float32")
        if namespace["dtype"] not in STORAGE_DTYPES:
            raise ValueError(f"namespace dtype must be one of {', '.join(STORAGE_DTYPES)}, "
                             f"got {namespace['dtype']!r}")
        self.namespace = namespace
        self.dtype: str = namespace["dtype"]
        self.key = namespace_key(namespace)
        self.root = Path(root).expanduser()
        self.path = self.root / self.key
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_namespace_file()
        self.last_computed = 0  # unique texts computed by the last get_or_compute
        self.n_computed = 0     # unique texts computed by this object, in all
        self._reset_index()

    def _check_namespace_file(self) -> None:
        file = self.path / "namespace.json"
        text = json.dumps(self.namespace, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        if file.exists():
            try:
                stored = json.loads(file.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"feature cache {self.path}: unreadable namespace.json ({e}); delete it") from None
            if canonical_json(stored) != canonical_json(self.namespace):
                raise ValueError(f"feature cache {self.path}: namespace.json holds {canonical_json(stored)}, not "
                                 f"{canonical_json(self.namespace)} (hash collision or an edited file)")
            return
        _write_atomic(file, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    # --- index ---------------------------------------------------------------------------------------------------

    def _reset_index(self) -> None:
        self._shards: list[_Shard] = []
        self._seen: set[str] = set()        # shard names indexed or skipped as corrupt
        self._skipped: list[Path] = []
        self._sorted_keys = np.zeros(0, KEY_DTYPE)
        self._sorted_hi = np.zeros(0, np.uint64)
        self._shard_of = np.zeros(0, np.int32)
        self._row_of = np.zeros(0, np.int64)
        self._scanned = False

    def _shard_files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("."))

    def refresh(self) -> None:
        """Index shards that appeared since the last scan (written by this or another process)."""
        new = []
        for p in self._shard_files():
            if p.name in self._seen:
                continue
            try:
                shard = _Shard(p, self.key)  # a shard of another namespace raises ValueError
            except FileNotFoundError:
                continue  # deleted since the listing (clear() in another process)
            except (_CorruptShard, OSError) as e:
                self._seen.add(p.name)
                self._skipped.append(p)
                warnings.warn(f"feature cache: skipping corrupt shard {p} ({e}); its texts will be computed "
                              "again. Delete the file to silence this warning.", stacklevel=2)
                continue
            new.append(shard)
        self._add_shards([s for s in new if s.n])  # raises on a dimension mismatch, every time it is tried
        self._seen.update(s.path.name for s in new)
        self._scanned = True

    def _ensure_index(self) -> None:
        if not self._scanned:
            self.refresh()

    def _add_shards(self, shards: list[_Shard], keys: list[np.ndarray] | None = None) -> None:
        if not shards:
            return
        dim = self._shards[0].dim if self._shards else shards[0].dim
        ref = self._shards[0].path if self._shards else shards[0].path
        for s in shards:
            if s.dim != dim:
                raise ValueError(f"feature cache shard {s.path} has features of dim {s.dim}, but {ref} has {dim}: "
                                 "one namespace holds one model's features; move or delete the odd shard")
        first = len(self._shards)
        self._shards.extend(shards)
        keys = keys if keys is not None else [s.keys() for s in shards]
        all_keys = np.concatenate([self._sorted_keys, *keys])
        shard_of = np.concatenate([self._shard_of, *[np.full(s.n, first + i, np.int32) for i, s in enumerate(shards)]])
        row_of = np.concatenate([self._row_of, *[np.arange(s.n, dtype=np.int64) for s in shards]])
        order = np.lexsort((all_keys["lo"], all_keys["hi"]))  # stable: already indexed entries come first
        all_keys, shard_of, row_of = all_keys[order], shard_of[order], row_of[order]
        keep = np.ones(len(all_keys), bool)
        keep[1:] = all_keys[1:] != all_keys[:-1]  # a text stored twice is read from its first shard
        self._sorted_keys, self._shard_of, self._row_of = all_keys[keep], shard_of[keep], row_of[keep]
        self._sorted_hi = np.ascontiguousarray(self._sorted_keys["hi"])

    def _locate(self, keys: np.ndarray) -> np.ndarray:
        """Index into the sorted key table of each key, -1 where not stored."""
        self._ensure_index()
        if not len(self._sorted_keys):
            return np.full(len(keys), -1, np.int64)
        table = self._sorted_keys
        # search on the first word (a fast uint64 search); equal first words with other second words are
        # vanishingly rare, and searched again on the whole key
        pos = np.minimum(np.searchsorted(self._sorted_hi, keys["hi"]), len(table) - 1)
        hit = table[pos] == keys
        again = ~hit & (self._sorted_hi[pos] == keys["hi"])
        if again.any():
            pos[again] = np.minimum(np.searchsorted(table, keys[again]), len(table) - 1)
            hit[again] = table[pos[again]] == keys[again]
        return np.where(hit, pos, -1)

    # --- public API ----------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int | None:
        """Feature dimension, or None while nothing is stored."""
        self._ensure_index()
        return self._shards[0].dim if self._shards else None

    def __len__(self) -> int:
        """Number of distinct texts stored."""
        self._ensure_index()
        return len(self._sorted_keys)

    def __contains__(self, text: str) -> bool:
        return bool(self._locate(_keys(text_hashes([text])))[0] >= 0)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, n={len(self)}, dim={self.dim}, dtype={self.dtype})"

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found, features)`` of (N, 2) uint64 ``hashes``: found (N,) bool, features (N, D) float32.

        Rows not found are zeros, ready for the caller to fill (``features[~found] = compute(...)``). With an
        empty cache D is unknown and ``features`` is (N, 0). Values are the stored ones (float16 / bfloat16
        storage read back as float32).
        """
        pos = self._locate(_keys(hashes))
        found = pos >= 0
        out = np.zeros((len(pos), self.dim or 0), np.float32)
        if found.any():
            idx = np.flatnonzero(found)
            shard_of, row_of = self._shard_of[pos[idx]], self._row_of[pos[idx]]
            for s in np.unique(shard_of):
                sel = shard_of == s
                rows = row_of[sel]
                order = np.argsort(rows)  # read the memory map in file order
                block = np.empty((len(rows), out.shape[1]), np.float32)
                block[order] = self._shards[s].rows(rows[order])
                out[idx[sel]] = block
        return found, out

    def append(self, hashes: np.ndarray, features: np.ndarray) -> int:
        """Store ``features`` (N, D) of ``hashes`` (N, 2) as one new shard; returns how many vectors it wrote.

        Hashes already stored (by any process, as of a fresh scan) or repeated within the call are skipped;
        nothing is written when none is new. Features must be finite and, once the cache holds any, of its dim.
        """
        return self._append(_keys(hashes), features)[0]

    def _append(self, keys: np.ndarray, features) -> tuple[int, np.ndarray]:
        """Write the new ones of ``keys`` to a shard; returns (count, all features as stored, in float32)."""
        features = self._as_features(features, len(keys))
        self.refresh()
        as_stored, stored = self._to_storage(features)
        _, first = np.unique(keys, return_index=True)
        new = np.zeros(len(keys), bool)
        new[first] = True
        new &= self._locate(keys) < 0
        if not new.any():
            return 0, stored
        keys = keys[new]
        from safetensors.torch import save_file

        tensors = {"hashes": torch.from_numpy(_hashes(keys)),
                   "features": as_stored if new.all() else as_stored[torch.from_numpy(new)]}
        meta = {"format": _FORMAT, "namespace_key": self.key, "namespace": canonical_json(self.namespace)}
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        path = self.path / name
        _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        self._seen.add(name)
        self._add_shards([_Shard(path, self.key)], keys=[keys])
        return len(keys), stored

    def _as_features(self, features, n: int) -> np.ndarray:
        if hasattr(features, "detach"):  # a torch tensor
            features = features.detach().float().cpu().numpy()
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or len(f) != n or f.shape[1] < 1:
            raise ValueError(f"features must be ({n}, D) with D >= 1, got shape {f.shape}")
        dim = self.dim
        if dim is not None and f.shape[1] != dim:
            raise ValueError(f"features have dim {f.shape[1]}, but the feature cache {self.path} holds dim {dim}")
        bad = ~np.isfinite(f).all(axis=1)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} of {n} feature vectors are not finite (first at row "
                             f"{int(np.flatnonzero(bad)[0])}); refusing to cache them")
        return f

    def _to_storage(self, f: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """``f`` in the storage dtype (a tensor to write), and in float32 as the cache will read it back."""
        t = torch.from_numpy(np.ascontiguousarray(f)).to(getattr(torch, self.dtype))
        if self.dtype == "float32":
            return t, f
        out = t.float().numpy()
        if not np.isfinite(out).all():
            raise ValueError(f"features overflow {self.dtype} (largest magnitude {float(np.abs(f).max()):.4g}); "
                             "use a float32 or bfloat16 namespace")
        return t, out

    def info(self) -> dict:
        """path, namespace, n_vectors, dim, dtype, shards, bytes (of the shards), skipped_shards, temp_files."""
        self.refresh()
        temp = [p for p in self.path.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        return {"path": str(self.path), "namespace": dict(self.namespace), "n_vectors": len(self), "dim": self.dim,
                "dtype": self.dtype, "shards": len(self._shards), "bytes": sum(_size(s.path) for s in self._shards),
                "skipped_shards": [str(p) for p in self._skipped], "temp_files": len(temp)}

    def clear(self) -> None:
        """Delete this namespace's shards and leftover temporary files (not while another process writes)."""
        for s in self._shards:
            s.close()
        for p in self.path.iterdir():
            if (p.suffix == ".safetensors" and not p.name.startswith(".")) or p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
        self._reset_index()

    def get_or_compute(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray], batch_size: int = 256,
                       progress: bool | str = "auto", shard_size: int = 50000) -> np.ndarray:
        """(len(texts), D) float32 features of ``texts`` in input order, computing only what the cache lacks.

        Each unique missing text is passed to ``compute`` once, in order of first appearance, in lists of at
        most ``batch_size``; ``compute`` returns an (n, D) array (or tensor). Results are stored as they come, in
        shards of at most ``shard_size`` vectors, so an interruption keeps every finished shard (and, if
        ``compute`` raises, what it returned before). Values are returned as stored: with a float16 / bfloat16
        namespace, freshly computed features are rounded exactly as a later read would return them.
        ``progress``: a bar with texts/s on stderr; ``'auto'`` shows it when stderr is a terminal.
        Sets ``self.last_computed`` (unique texts computed by this call) and adds it to ``self.n_computed``.
        """
        if batch_size < 1 or shard_size < 1:
            raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
        if progress not in (True, False, "auto"):
            raise ValueError(f"progress must be True, False or 'auto', got {progress!r}")
        self.last_computed = 0
        texts = texts if isinstance(texts, (list, tuple)) else list(texts)  # positional indexing below
        keys = _keys(text_hashes(texts))
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # unique texts in order of first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        uniq, first, inverse = uniq[order], first[order], rank[inverse.reshape(-1)]
        self.refresh()
        found, out = self.lookup(_hashes(uniq))
        missing = np.flatnonzero(~found)
        if len(missing):
            out = self._compute_missing(texts, uniq, first, missing, out, compute, batch_size, progress, shard_size)
        return out if len(uniq) == len(texts) else out[inverse]  # all distinct: already in input order

    def _compute_missing(self, texts, uniq, first, missing, out, compute, batch_size, progress, shard_size):
        pending: list[tuple[np.ndarray, np.ndarray]] = []  # (unique indices, features) computed, not yet stored
        n_pending = 0

        def flush(limit: int) -> None:
            nonlocal pending, n_pending, out
            while n_pending >= limit and n_pending:
                idx = np.concatenate([p[0] for p in pending])
                feats = np.concatenate([p[1] for p in pending])
                take = min(shard_size, len(idx))
                _, stored = self._append(uniq[idx[:take]], feats[:take])
                if out.shape[1] == 0:
                    out = np.zeros((len(uniq), stored.shape[1]), np.float32)
                out[idx[:take]] = stored
                pending = [(idx[take:], feats[take:])] if take < len(idx) else []
                n_pending -= take

        show = sys.stderr.isatty() if progress == "auto" else bool(progress)
        with _ProgressBar(len(missing), show, f"encoding {len(missing)} new texts") as advance:
            try:
                for start in range(0, len(missing), batch_size):
                    idx = missing[start:start + batch_size]
                    batch = [texts[int(first[i])] for i in idx]
                    feats = compute(batch)
                    self.last_computed += len(idx)
                    self.n_computed += len(idx)
                    feats = self._as_features(feats, len(idx))
                    if pending and feats.shape[1] != pending[0][1].shape[1]:
                        raise ValueError(f"compute() returned features of dim {feats.shape[1]} after dim "
                                         f"{pending[0][1].shape[1]} for earlier batches")
                    pending.append((idx, feats))
                    n_pending += len(idx)
                    flush(shard_size)
                    advance(len(idx))
            except BaseException:
                try:  # keep what compute() returned before failing
                    flush(1)
                except Exception as e:
                    warnings.warn(f"feature cache: could not store the {n_pending} vectors computed before the "
                                  f"error ({e})", stacklevel=3)
                raise
            flush(1)
        return out


class _ProgressBar:
    """Context manager yielding ``advance(n)``: a tqdm bar (rich if tqdm is missing) counting texts/s, or nothing."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.total, self.enabled, self.desc = total, enabled, desc
        self._close = lambda: None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=self.total, desc=self.desc, unit="text", file=sys.stderr, dynamic_ncols=True)
            self._close = bar.close
            return bar.update
        import rich.progress as rp
        from rich.console import Console
        from rich.text import Text

        class Rate(rp.ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed or 0:,.1f} texts/s")

        bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(), Rate(),
                          rp.TimeRemainingColumn(), console=Console(stderr=True))
        bar.start()
        task = bar.add_task(self.desc, total=self.total)
        self._close = bar.stop
        return lambda n: bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        self._close()
