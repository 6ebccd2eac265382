"""The on-disk feature cache of the frozen-encoder backbone: reuse, dedup, order, crash safety, corrupt shards."""

import json
import sys
import zlib

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from plrm.backbones.cache import FeatureCache, namespace_key, text_hashes

NS = {"model": "tiny-encoder", "revision": "abc123", "pooling": "mean", "max_length": 32, "normalize": True}
DIM = 8


class Encoder:
    """A deterministic fake encoder that records every text it is asked to encode."""

    def __init__(self, dim=DIM, fail_on_call=None):
        self.dim, self.fail_on_call = dim, fail_on_call
        self.calls: list[list[str]] = []

    @staticmethod
    def vector(text, dim=DIM):
        return np.random.default_rng(zlib.crc32(text.encode())).standard_normal(dim).astype(np.float32)

    def __call__(self, texts):
        self.calls.append(list(texts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("encoder crashed")
        return np.stack([self.vector(t, self.dim) for t in texts])

    @property
    def texts(self):
        return [t for call in self.calls for t in call]


def shard_files(cache):
    return sorted(cache.path.glob("shard-*.safetensors"))


def feature_bytes(cache):
    """Bytes of the features tensors of a cache's shards, read from the safetensors headers."""
    total = 0
    for p in shard_files(cache):
        raw = p.read_bytes()
        begin, end = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["features"]["data_offsets"]
        total += end - begin
    return total


def test_text_hashes_are_blake2b_128_and_stable():
    h = text_hashes(["hello world", "héllo ✓", "hello world"])
    assert h.dtype == np.uint64 and h.shape == (3, 2)
    # hashlib.blake2b(text.encode('utf-8'), digest_size=16).hexdigest(), computed independently:
    # 'hello world' -> e9a804b2e527fd3601d2ffc0bb023cd6, 'héllo ✓' -> e21adba5972c063f395e06958cdcaa04
    assert h[0].tolist() == [0xE9A804B2E527FD36, 0x01D2FFC0BB023CD6]
    assert h[1].tolist() == [0xE21ADBA5972C063F, 0x395E06958CDCAA04]
    assert (h[0] == h[2]).all()
    assert text_hashes([]).shape == (0, 2)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        text_hashes(["a", 3])


def test_round_trip_is_exact_for_float32(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    assert cache.dim is None and len(cache) == 0
    texts = [f"text {i}" for i in range(20)]
    feats = np.random.default_rng(0).standard_normal((20, DIM)).astype(np.float32)
    assert cache.append(text_hashes(texts), feats) == 20
    assert cache.dim == DIM and len(cache) == 20
    for c in (cache, FeatureCache(tmp_path, NS)):
        found, got = c.lookup(text_hashes(texts[::-1]))
        assert found.all() and got.dtype == np.float32
        np.testing.assert_array_equal(got, feats[::-1])


def test_lookup_marks_missing_rows_with_zeros(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    found, feats = cache.lookup(text_hashes(["a", "b"]))
    assert not found.any() and feats.shape == (2, 0)  # empty cache: D unknown
    cache.append(text_hashes(["a"]), Encoder()(["a"]))
    found, feats = cache.lookup(text_hashes(["b", "a", "c"]))
    assert found.tolist() == [False, True, False]
    np.testing.assert_array_equal(feats[1], Encoder.vector("a"))
    assert (feats[[0, 2]] == 0).all()
    assert "a" in cache and "b" not in cache


def test_each_unique_text_is_computed_once_and_results_follow_input_order(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    texts = ["b", "a", "b", "c", "a", "a", "d", "b", "c", "b"]  # N=10, M=4 unique
    enc = Encoder()
    out = cache.get_or_compute(texts, enc, batch_size=3, progress=False)
    assert sorted(enc.texts) == ["a", "b", "c", "d"] and len(enc.texts) == 4
    assert enc.texts == ["b", "a", "c", "d"]  # unique texts in order of first appearance
    assert [len(c) for c in enc.calls] == [3, 1]
    assert cache.last_computed == 4 and cache.n_computed == 4
    assert out.shape == (10, DIM) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.stack([Encoder.vector(t) for t in texts]))

    # a partly cached request computes only the new texts; the cumulative counter adds up
    enc2 = Encoder()
    out = cache.get_or_compute(["e", "a", "e", "f"], enc2, progress=False)
    assert enc2.texts == ["e", "f"] and cache.last_computed == 2 and cache.n_computed == 6
    np.testing.assert_array_equal(out, np.stack([Encoder.vector(t) for t in ["e", "a", "e", "f"]]))


def test_a_second_cache_on_the_same_namespace_computes_nothing(tmp_path):
    texts = [f"response {i % 7}" for i in range(30)]
    first = FeatureCache(tmp_path, NS).get_or_compute(texts, Encoder(), progress=False)
    again = FeatureCache(tmp_path, dict(reversed(list(NS.items()))))  # same dict, other key order
    enc = Encoder()
    out = again.get_or_compute(texts, enc, progress=False)
    assert enc.calls == [] and again.last_computed == 0 and again.n_computed == 0
    np.testing.assert_array_equal(out, first)


def test_another_namespace_uses_another_directory_and_computes_again(tmp_path):
    a = FeatureCache(tmp_path, NS)
    a.get_or_compute(["x", "y"], Encoder(), progress=False)
    b = FeatureCache(tmp_path, {**NS, "max_length": 64})
    enc = Encoder()
    b.get_or_compute(["x", "y"], enc, progress=False)
    assert enc.texts == ["x", "y"] and b.last_computed == 2
    assert a.path != b.path and a.path.parent == b.path.parent == tmp_path
    assert a.path.name == namespace_key({**NS, "dtype": "float32"})
    assert json.loads((b.path / "namespace.json").read_text()) == {**NS, "max_length": 64, "dtype": "float32"}
    # the default storage dtype is part of the namespace: naming it explicitly is the same cache
    assert FeatureCache(tmp_path, {**NS, "dtype": "float32"}).path == a.path
    assert len(list(tmp_path.iterdir())) == 2


def test_shards_hold_at_most_shard_size_vectors(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    enc = Encoder()
    cache.get_or_compute([f"t{i}" for i in range(7)], enc, batch_size=2, shard_size=3, progress=False)
    assert all(len(c) <= 2 for c in enc.calls)
    assert cache.info()["shards"] == 3
    reopened = FeatureCache(tmp_path, NS)
    assert sorted(s.n for s in (reopened.refresh() or reopened._shards)) == [1, 3, 3]
    assert len(reopened) == 7


def test_a_crash_keeps_finished_shards_and_ignores_temp_files(tmp_path):
    texts = [f"t{i}" for i in range(10)]
    cache = FeatureCache(tmp_path, NS)
    enc = Encoder(fail_on_call=3)  # batches of 2, shards of 2: two shards are on disk when it raises
    with pytest.raises(RuntimeError, match="encoder crashed"):
        cache.get_or_compute(texts, enc, batch_size=2, shard_size=2, progress=False)
    assert len(shard_files(cache)) == 2
    # what a crash in the middle of a write leaves: a temp file, partially written
    (cache.path / ".shard-00000000000000000001-1-deadbeef.safetensors.1-deadbeef.tmp").write_bytes(b"\x10\x00garbage")
    reopened = FeatureCache(tmp_path, NS)
    assert len(reopened) == 4 and reopened.info()["temp_files"] == 1
    enc2 = Encoder()
    out = reopened.get_or_compute(texts, enc2, batch_size=2, shard_size=2, progress=False)
    assert enc2.texts == texts[4:] and reopened.last_computed == 6
    np.testing.assert_array_equal(out, np.stack([Encoder.vector(t) for t in texts]))


def test_vectors_computed_before_an_error_are_stored(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    enc = Encoder(fail_on_call=2)  # the first batch is computed but its shard (size 100) is not full yet
    with pytest.raises(RuntimeError):
        cache.get_or_compute(["a", "b", "c", "d"], enc, batch_size=2, shard_size=100, progress=False)
    assert cache.last_computed == 2  # the batch whose compute() raised is not counted
    assert len(FeatureCache(tmp_path, NS)) == 2


def test_truncated_shard_is_skipped_with_a_warning_naming_it(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    cache.get_or_compute(["a", "b"], Encoder(), progress=False)
    cache.get_or_compute(["c", "d"], Encoder(), progress=False)
    bad = shard_files(cache)[1]
    bad.write_bytes(bad.read_bytes()[:-5])  # a partial copy
    (cache.path / "shard-empty.safetensors").write_bytes(b"")
    (cache.path / "shard-junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")

    reopened = FeatureCache(tmp_path, NS)
    with pytest.warns(UserWarning, match="corrupt shard") as record:
        assert len(reopened) == 2
    messages = " ".join(str(w.message) for w in record)
    for name in (bad.name, "shard-empty.safetensors", "shard-junk.safetensors"):
        assert name in messages
    assert "truncated" in messages
    enc = Encoder()
    out = reopened.get_or_compute(["a", "b", "c", "d"], enc, progress=False)
    assert enc.texts == ["c", "d"]  # recomputed and stored in a new shard
    np.testing.assert_array_equal(out, np.stack([Encoder.vector(t) for t in "abcd"]))
    assert sorted(map(str, reopened.info()["skipped_shards"])) == sorted(
        str(cache.path / n) for n in (bad.name, "shard-empty.safetensors", "shard-junk.safetensors"))


def test_a_shard_of_another_dimension_is_an_error_naming_it(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    cache.get_or_compute(["a"], Encoder(), progress=False)
    odd = cache.path / "shard-odd.safetensors"
    save_file({"hashes": text_hashes(["z"]), "features": np.zeros((1, DIM + 1), np.float32)}, str(odd))
    reopened = FeatureCache(tmp_path, NS)
    for _ in range(2):  # not forgotten after the first error
        with pytest.raises(ValueError, match=r"shard-odd\.safetensors has features of dim 9.*has 8"):
            len(reopened)
    odd.unlink()
    with pytest.raises(ValueError, match="features have dim 3, but the feature cache .* holds dim 8"):
        cache.append(text_hashes(["q"]), np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="dim 3, but the feature cache"):
        cache.get_or_compute(["q"], Encoder(dim=3), progress=False)


def test_a_shard_copied_from_another_namespace_is_an_error(tmp_path):
    a = FeatureCache(tmp_path, NS)
    a.get_or_compute(["a"], Encoder(), progress=False)
    b = FeatureCache(tmp_path, {**NS, "revision": "other"})
    src = shard_files(a)[0]
    (b.path / src.name).write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match=f"{src.name} belongs to namespace {a.key}"):
        len(b)


def test_append_skips_stored_and_repeated_hashes(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    enc = Encoder()
    assert cache.append(text_hashes(list("abc")), enc(list("abc"))) == 3
    changed = enc(list("abcde")) + 100  # different values for stored texts must not overwrite them
    assert cache.append(text_hashes(list("abcde")), changed) == 2
    assert cache.append(text_hashes(list("abcde")), changed) == 0  # nothing new: no shard written
    assert cache.append(text_hashes(list("ffg")), enc(list("ffg"))) == 2
    assert len(cache) == 7 and len(shard_files(cache)) == 3
    # a second process that has not seen the new shards yet also skips them
    stale = FeatureCache(tmp_path, NS)
    len(stale)
    cache.append(text_hashes(["h"]), enc(["h"]))
    assert stale.append(text_hashes(["h", "i"]), enc(["h", "i"])) == 1
    _, got = FeatureCache(tmp_path, NS).lookup(text_hashes(list("abcdefghi")))
    np.testing.assert_array_equal(got[:3], enc(list("abc")))
    np.testing.assert_array_equal(got[3:5], changed[3:5])


def test_bad_features_are_refused(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    with pytest.raises(ValueError, match="not finite"):
        cache.append(text_hashes(["a", "b"]), np.array([[1.0, 2.0], [np.nan, 0.0]], np.float32))
    with pytest.raises(ValueError, match=r"must be \(2, D\)"):
        cache.get_or_compute(["a", "b"], lambda texts: np.zeros((1, 4), np.float32), progress=False)
    with pytest.raises(ValueError, match="overflow float16"):
        FeatureCache(tmp_path, {**NS, "dtype": "float16"}).append(text_hashes(["a"]), np.full((1, 2), 1e6))
    with pytest.raises(ValueError, match="dtype must be one of"):
        FeatureCache(tmp_path, {**NS, "dtype": "int8"})
    with pytest.raises(TypeError, match="JSON-serializable"):
        FeatureCache(tmp_path, {**NS, "model": object()})
    assert len(cache) == 0 and shard_files(cache) == []
    # torch tensors are accepted
    out = cache.get_or_compute(["a"], lambda texts: torch.ones(len(texts), 4), progress=False)
    np.testing.assert_array_equal(out, np.ones((1, 4), np.float32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_namespaces_store_half_the_bytes(tmp_path, dtype):
    texts = [f"t{i}" for i in range(50)]
    full = FeatureCache(tmp_path, NS)
    half = FeatureCache(tmp_path, {**NS, "dtype": dtype})
    out32 = full.get_or_compute(texts, Encoder(dim=64), progress=False)
    out16 = half.get_or_compute(texts, Encoder(dim=64), progress=False)
    assert half.path != full.path
    assert feature_bytes(half) * 2 == feature_bytes(full) == 50 * 64 * 4
    assert half.info()["bytes"] < 0.6 * full.info()["bytes"]
    expected = torch.from_numpy(out32).to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(out16, expected)  # what was computed is returned as stored
    _, again = FeatureCache(tmp_path, {**NS, "dtype": dtype}).lookup(text_hashes(texts))
    np.testing.assert_array_equal(again, expected)  # and reads back identically


def test_info_and_clear(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    cache.get_or_compute(["a", "b", "c"], Encoder(), shard_size=2, progress=False)
    info = cache.info()
    assert info["path"] == str(cache.path) and info["n_vectors"] == 3 and info["dim"] == DIM
    assert info["shards"] == 2 and info["bytes"] == sum(p.stat().st_size for p in shard_files(cache))
    assert info["namespace"]["model"] == "tiny-encoder" and info["dtype"] == "float32"
    cache.clear()
    assert len(cache) == 0 and cache.dim is None and shard_files(cache) == []
    assert (cache.path / "namespace.json").exists()
    enc = Encoder()
    cache.get_or_compute(["a"], enc, progress=False)
    assert enc.texts == ["a"]


def test_empty_input_and_all_cached(tmp_path):
    cache = FeatureCache(tmp_path, NS)
    assert cache.get_or_compute([], Encoder(), progress=False).shape == (0, 0)
    cache.get_or_compute(["a"], Encoder(), progress=False)
    assert cache.get_or_compute([], Encoder(), progress=False).shape == (0, DIM)
    assert cache.get_or_compute(["a", "a"], Encoder(), progress=False).shape == (2, DIM)
    with pytest.raises(ValueError, match="progress must be"):
        cache.get_or_compute(["a"], Encoder(), progress="yes")


def test_progress_bar_reports_texts_per_second(tmp_path, capsys, monkeypatch):
    cache = FeatureCache(tmp_path, NS)
    cache.get_or_compute(["a", "b"], Encoder(), progress=True)
    assert "text/s" in capsys.readouterr().err  # tqdm
    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: rich
    cache.get_or_compute(["c", "d"], Encoder(), progress=True)
    assert "texts/s" in capsys.readouterr().err
    cache.get_or_compute(["e"], Encoder(), progress="auto")  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
