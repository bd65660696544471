"""The key schema: one hash tag per generation, so one Cluster slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from app.errors import InvalidRequest
from app.keys import Keys, check_generation_id, new_generation_id


def test_all_keys_of_a_generation_share_one_slot() -> None:
    keys = Keys("tt")
    generation_id = new_generation_id()
    names = [*keys.generation_keys(generation_id), keys.live_channel(generation_id)]
    assert all(f"{{{generation_id}}}" in name for name in names)
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert len(set(names)) == len(names)


def test_ids_are_random_url_safe_and_128_bits() -> None:
    ids = {new_generation_id() for _ in range(1000)}
    assert len(ids) == 1000
    for generation_id in ids:
        assert len(generation_id) == 22  # 16 bytes, base64url, no padding
        assert check_generation_id(generation_id) == generation_id


@pytest.mark.parametrize(
    "bad", ["", "short", "has space in it!!!!!", "a" * 65, "../../etc/passwd00"]
)
def test_malformed_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        check_generation_id(bad)


def test_prefixes_separate_tenants() -> None:
    generation_id = new_generation_id()
    assert Keys("a").meta(generation_id) != Keys("b").meta(generation_id)
    assert Keys("a").jobs != Keys("b").jobs


@pytest.mark.parametrize("name", ["chat", "chat/42", "a:b@c", "generations-like/x"])
def test_all_keys_of_a_stream_share_one_slot(name: str) -> None:
    keys = Keys("tt")
    names = [*keys.stream_keys(name), keys.stream_channel(name)]
    assert len({key_slot(key.encode()) for key in names}) == 1
    assert len(set(names)) == len(names)
    assert keys.stream_keys(name)[0] != keys.meta(name)  # never a generation's key


def test_the_quotas_of_one_api_key_share_one_slot() -> None:
    keys = Keys("tt")
    owner = "b3duZXItaGFzaC0xMjM0NQ"
    names = [keys.owner_running(owner), keys.owner_created(owner)]
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert len(set(names)) == 2


def test_one_redis_keeps_one_unsharded_set_of_global_keys() -> None:
    keys = Keys("tt")
    (only,) = keys.shards
    assert (only.jobs, only.open_generations, only.recent_generations, only.cancel_channel) == (
        "tt:{jobs}",
        "tt:{open}",
        "tt:{recent}",
        "tt:cancel",
    )
    assert keys.shard(new_generation_id()) is only


def test_each_shard_lives_in_one_slot_and_generations_spread_over_all() -> None:
    keys = Keys("tt", shards=8)
    assert [shard.index for shard in keys.shards] == list(range(8))
    slots = set()
    for shard in keys.shards:
        names = [shard.jobs, shard.open_generations, shard.recent_generations, shard.cancel_channel]
        (slot,) = {key_slot(name.encode()) for name in names}
        slots.add(slot)
    assert len(slots) == 8
    generation_id = new_generation_id()
    assert keys.shard(generation_id) is keys.shard(generation_id)
    assert {keys.shard(new_generation_id()).index for _ in range(400)} == set(range(8))
