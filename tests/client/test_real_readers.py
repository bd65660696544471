"""The client against real reader and worker processes: killed, frozen, trimmed.

Each test ends with the client holding every event the log holds, once, in order.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from app import events
from app.client import Client, Entry, Gap, Item, SyncClient
from app.errors import InvalidRequest, NotFound
from app.store import GenerationLog
from tests.client.conftest import ClientLog, StartProcess, log_of

MESSAGES = [{"role": "user", "content": "hi"}]


def entries(items: list[Item]) -> list[Entry]:
    return [item for item in items if isinstance(item, Entry)]


async def read_until(stream: asyncio.Queue[Item], count: int, items: list[Item]) -> None:
    while len(entries(items)) < count:
        items.append(await stream.get())


async def consume(client: Client, generation_id: str, queue: asyncio.Queue[Item]) -> None:
    async for item in client.events(generation_id):
        queue.put_nowait(item)


async def drain(task: asyncio.Task[None], queue: asyncio.Queue[Item], items: list[Item]) -> None:
    await task
    while not queue.empty():
        items.append(queue.get_nowait())


async def test_a_reader_killed_and_restarted_mid_stream(
    start_process: StartProcess, log: GenerationLog, client_log: ClientLog
) -> None:
    await start_process("worker")
    reader = await start_process("serve")
    async with Client(reader.url, idle_timeout=5.0) as client:
        generation = await client.create(
            "sim", MESSAGES, sim={"tokens": 300, "tokens_per_second": 200, "tool_calls": 1}
        )
        queue: asyncio.Queue[Item] = asyncio.Queue()
        items: list[Item] = []
        task = asyncio.create_task(consume(client, generation.id, queue))
        await read_until(queue, 40, items)

        await reader.kill()
        await client_log.wait_for("reconnecting")  # refused while no reader is up
        await start_process("serve", port=reader.port)
        await drain(task, queue, items)

    received = entries(items)
    assert received == await log_of(log, generation.id)
    assert [entry.seq for entry in received] == list(range(1, len(received) + 1))
    assert isinstance(received[-1].event, events.Done)
    assert len(received) > 40 + 100, "the reader must die mid-stream"
    assert not any(isinstance(item, Gap) for item in items)


async def test_a_reader_frozen_longer_than_the_idle_timeout(
    start_process: StartProcess, log: GenerationLog, client_log: ClientLog
) -> None:
    await start_process("worker")
    reader = await start_process("serve")
    async with Client(reader.url, idle_timeout=1.0) as client:
        generation = await client.create(
            "sim", MESSAGES, sim={"tokens": 200, "tokens_per_second": 100}
        )
        queue: asyncio.Queue[Item] = asyncio.Queue()
        items: list[Item] = []
        task = asyncio.create_task(consume(client, generation.id, queue))
        await read_until(queue, 20, items)

        reader.signal(signal.SIGSTOP)
        # Silence is a broken connection, and so is a reconnect nobody answers.
        await client_log.wait_for("connection lost")
        await client_log.wait_for("reconnecting", count=2)
        reader.signal(signal.SIGCONT)
        await drain(task, queue, items)

    received = entries(items)
    assert received == await log_of(log, generation.id)
    assert [entry.seq for entry in received] == list(range(1, len(received) + 1))
    assert len(received) == 202  # started, 200 tokens, done


async def test_heartbeats_keep_a_slow_stream_on_one_connection(
    start_process: StartProcess, log: GenerationLog, client_log: ClientLog
) -> None:
    await start_process("worker")
    reader = await start_process("serve", TOKENTAPE_HEARTBEAT_SECONDS="0.1")
    # 3 s between the two tokens, an idle timeout of 1.5 s: only heartbeats keep it alive.
    async with Client(reader.url, idle_timeout=1.5) as client:
        generation = await client.create(
            "sim", MESSAGES, sim={"tokens": 2, "tokens_per_second": 1 / 3}
        )
        stream = client.stream(generation.id)
        items = [item async for batch in stream for item in batch]

    assert entries(items) == await log_of(log, generation.id)
    assert stream.connections == 1
    assert not [message for message in client_log.messages if "connection lost" in message]


async def test_a_trimmed_log_is_reported_as_a_gap_then_read_to_the_end(
    start_process: StartProcess, log: GenerationLog
) -> None:
    # Redis trims whole stream nodes (100 entries), so the cap takes effect in steps.
    await start_process("worker", TOKENTAPE_MAX_EVENTS_PER_GENERATION="20")
    reader = await start_process("serve")
    async with Client(reader.url) as client:
        generation = await client.create(
            "sim", MESSAGES, sim={"tokens": 400, "tokens_per_second": 1e9}
        )
        # Read to its end first: a reader as fast as the worker may see every event.
        first = [item async for item in client.events(generation.id)]
        items = [item async for item in client.events(generation.id)]

    kept = await log_of(log, generation.id)
    assert kept[0].seq > 1, "retention must have trimmed the log"
    assert items == [Gap(requested=1, first_available=kept[0].seq), *kept]
    assert entries(first)[-len(kept) :] == kept
    assert isinstance(kept[-1].event, events.Done)


async def test_text_and_status_of_a_finished_generation(start_process: StartProcess) -> None:
    reader = await start_process("serve", "--with-worker")
    async with Client(reader.url) as client:
        generation = await client.create(
            "sim", MESSAGES, sim={"tokens": 30, "tokens_per_second": 1e9, "seed": 5}
        )
        text = await client.text(generation)
        status = await client.status(generation.id)
        # Asked after the terminal event: 204, nothing to hand out.
        after_end = [item async for item in client.events(generation.id, after=status.last_seq)]
        with pytest.raises(NotFound) as raised:
            await client.status("A" * 22)

    assert text
    assert status.status == "done"
    assert status.last_seq == 32
    assert after_end == []
    assert raised.value.code == "generation_not_found"
    assert raised.value.status == 404


async def test_the_sync_client_has_the_same_methods(start_process: StartProcess) -> None:
    reader = await start_process("serve", "--with-worker")

    def script() -> tuple[str, list[Item], str, str]:
        with SyncClient(reader.url) as client:
            generation = client.create(
                "sim", MESSAGES, sim={"tokens": 20, "tokens_per_second": 1e9, "seed": 6}
            )
            items = list(client.events(generation.id))
            running = client.create("sim", MESSAGES, sim={"tokens": 1000, "tokens_per_second": 5})
            cancelled = client.cancel(running.id)
            return client.text(generation.id), items, cancelled, client.status(running.id).status

    text, items, cancelled, status = await asyncio.to_thread(script)

    tokens = [item.event for item in entries(items) if isinstance(item.event, events.Token)]
    assert text == "".join(token.text for token in tokens)
    assert len(tokens) == 20
    assert cancelled in {"running", "queued", "cancelled"}
    assert status in {"running", "cancelled"}


async def test_a_refused_request_raises_the_servers_error_code(
    start_process: StartProcess,
) -> None:
    reader = await start_process("serve")
    async with Client(reader.url) as client:
        with pytest.raises(InvalidRequest) as raised:
            await client.create("nosuch/model", MESSAGES)

    assert raised.value.code == "unknown_model"
    assert raised.value.status == 400
    assert "nosuch/model" in raised.value.message
