"""EmbeddingCache: budget, LRU order, counters, fp16 storage and the signed disk tier."""

from __future__ import annotations

import pytest
import torch

from SAMSegmentLib.cache import CacheKey, CacheMismatchError, DiskTier, EmbeddingCache
from SAMSegmentLib.errors import MemoryBudgetError

EMB_BYTES_FP16 = 256 * 64 * 64 * 2


def key(i: int, sig: str = "vol", axis: int = 0) -> CacheKey:
    return CacheKey(sig, axis, i, "litemedsam", "prep")


def emb(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 256, 64, 64, generator=g)


def test_hit_miss_and_fp16_storage():
    cache = EmbeddingCache(budget_bytes=10 * EMB_BYTES_FP16)
    assert cache.get(key(0)) is None
    e = emb(0)
    cache.put(key(0), e)
    got = cache.get(key(0))
    assert got.dtype == torch.float32
    assert torch.allclose(got, e, atol=2e-3, rtol=1e-3)  # fp16 round trip
    assert cache.bytes_used == EMB_BYTES_FP16
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    assert key(0) in cache and key(1) not in cache
    assert key(0, sig="other") not in cache  # the volume signature is part of the key


def test_lru_eviction_respects_budget_and_recency():
    cache = EmbeddingCache(budget_bytes=3 * EMB_BYTES_FP16)
    for i in range(3):
        cache.put(key(i), emb(i))
    cache.get(key(0))  # 0 becomes most recent; 1 is now the oldest
    cache.put(key(3), emb(3))
    assert key(1) not in cache and key(0) in cache and key(3) in cache
    assert cache.stats.evictions == 1
    assert cache.bytes_used <= cache.budget_bytes


@pytest.mark.slow
def test_walking_400_slices_stays_within_budget():
    budget = 64 * EMB_BYTES_FP16 + 123
    cache = EmbeddingCache(budget_bytes=budget)
    one = emb(0)
    peak = 0
    for i in range(400):
        cache.put(key(i), one)
        peak = max(peak, cache.bytes_used)
    assert peak <= budget
    assert len(cache) == 64 and cache.stats.evictions == 400 - 64
    assert cache.cached_indices("vol", 0) == list(range(336, 400))


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(MemoryBudgetError, match="must be positive"):
        EmbeddingCache(budget_bytes=0)
    cache = EmbeddingCache(budget_bytes=1 << 20)
    with pytest.raises(MemoryBudgetError, match="cannot hold one embedding") as err:
        cache.put(key(0), emb(0))
    assert "--cache-mib" in err.value.remedy


def test_disk_tier_round_trip_and_reload(tmp_path):
    cache = EmbeddingCache(budget_bytes=4 * EMB_BYTES_FP16, disk_dir=tmp_path / "c")
    cache.disk.bind("vol", "litemedsam", "prep")
    cache.put(key(5), emb(5))
    assert (tmp_path / "c" / "axis0_00005.pt").exists()
    fresh = EmbeddingCache(budget_bytes=4 * EMB_BYTES_FP16, disk_dir=tmp_path / "c")
    fresh.disk.bind("vol", "litemedsam", "prep")
    got = fresh.get(key(5))
    assert got is not None and torch.allclose(got, emb(5), atol=2e-3, rtol=1e-3)
    assert fresh.stats.disk_hits == 1 and fresh.stats.misses == 0


def test_disk_tier_refuses_another_volume(tmp_path):
    tier = DiskTier(tmp_path / "c")
    tier.bind("vol-a", "litemedsam", "prep")
    other = DiskTier(tmp_path / "c")
    with pytest.raises(CacheMismatchError, match="different volume_signature") as err:
        other.bind("vol-b", "litemedsam", "prep")
    assert "--cache-dir" in err.value.remedy
    with pytest.raises(CacheMismatchError, match="different model_id"):
        other.bind("vol-a", "sam_vit_b", "prep")
    other.bind("vol-b", "litemedsam", "prep", overwrite=True)  # explicit rebuild is allowed


def test_disk_tier_does_not_use_a_foreign_file(tmp_path, caplog):
    """A file copied in from another cache (right name, wrong signature inside) or an unreadable one
    is not used and not fatal: a miss, so the slice is encoded again and the file rewritten."""
    cache = EmbeddingCache(budget_bytes=4 * EMB_BYTES_FP16, disk_dir=tmp_path / "c")
    cache.disk.bind("vol", "litemedsam", "prep")
    cache.put(key(1), emb(1))
    torch.save({"meta": {"volume_signature": "elsewhere", "model_id": "litemedsam", "preprocessing": "prep",
                         "axis": 0, "index": 2}, "embedding": emb(2).half()}, tmp_path / "c" / "axis0_00002.pt")
    assert cache.get(key(2)) is None and "holds an embedding of another volume" in caplog.text
    (tmp_path / "c" / "axis0_00003.pt").write_bytes(b"garbage")
    assert cache.get(key(3)) is None and "cannot be read" in caplog.text
    assert cache.disk.rejected == 2 and cache.stats.misses == 2
    cache.put(key(3), emb(3))  # encoded again: the file is replaced by a good one
    fresh = EmbeddingCache(budget_bytes=4 * EMB_BYTES_FP16, disk_dir=tmp_path / "c")
    fresh.disk.bind("vol", "litemedsam", "prep")
    assert torch.allclose(fresh.get(key(3)), emb(3), atol=2e-3, rtol=1e-3)


def test_non_cache_folder_is_not_used(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not an embedding cache"):
        DiskTier(tmp_path).bind("vol", "litemedsam", "prep")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_disk_tier_only_serves_the_volume_it_is_bound_to(tmp_path):
    """Unbound, the tier holds nothing and writes nothing; after a rebind to another volume a
    save for the old volume (a worker finishing late) is skipped, not mixed into the folder."""
    tier = DiskTier(tmp_path / "c")
    assert not tier.has(key(1)) and tier.load(key(1)) is None
    tier.save(key(1), emb(1).half())
    assert not (tmp_path / "c").exists()
    tier.bind("vol", "litemedsam", "prep")
    tier.save(key(1), emb(1).half())
    assert tier.has(key(1)) and not tier.has(key(1, sig="other"))
    tier.bind("other", "litemedsam", "prep", overwrite=True)
    assert not (tmp_path / "c" / "axis0_00001.pt").exists()  # the old volume's files are gone
    tier.save(key(2), emb(2).half())  # still keyed to "vol"
    assert not (tmp_path / "c" / "axis0_00002.pt").exists()
    assert tier.load(key(2)) is None
