"""The tool-call accumulator: fragments in, one parsed call out, only when it is complete."""

from __future__ import annotations

import json

import pytest

from app.events import ToolCall, ToolCallDelta
from tests.providers.strategies import SEARCH_ARGUMENTS, WEATHER_ARGUMENTS
from workers.models.toolcalls import InvalidToolArguments, ToolCallAccumulator


def _cuts(text: str) -> list[tuple[str, str]]:
    return [(text[:i], text[i:]) for i in range(len(text) + 1)]


def test_every_pair_of_cut_points_in_two_interleaved_calls_parses_the_same() -> None:
    expected = (json.loads(WEATHER_ARGUMENTS), json.loads(SEARCH_ARGUMENTS))
    combinations = 0
    for weather_head, weather_tail in _cuts(WEATHER_ARGUMENTS):
        for search_head, search_tail in _cuts(SEARCH_ARGUMENTS):
            calls = ToolCallAccumulator()
            calls.add(0, id="call_w", name="get_weather")
            calls.add(1, id="call_s", name="search")
            # Interleaved: each call's fragments arrive between the other's.
            calls.add(1, arguments_delta=search_head)
            calls.add(0, arguments_delta=weather_head)
            calls.add(1, arguments_delta=search_tail)
            calls.add(0, arguments_delta=weather_tail)
            weather, search = calls.finish_all()
            assert (weather.arguments, search.arguments) == expected
            combinations += 1
    assert combinations == (len(WEATHER_ARGUMENTS) + 1) * (len(SEARCH_ARGUMENTS) + 1)


def test_a_delta_reports_id_and_name_once_and_skips_empty_fragments() -> None:
    calls = ToolCallAccumulator()

    first = calls.add(0, id="call_1", name="get_weather", arguments_delta="")
    # Some OpenAI-compatible servers repeat the id and name on every fragment.
    second = calls.add(0, id="call_1", name="get_weather", arguments_delta='{"a"')
    empty = calls.add(0, arguments_delta="")

    assert first == ToolCallDelta(index=0, id="call_1", name="get_weather")
    assert second == ToolCallDelta(index=0, arguments_delta='{"a"')
    assert empty is None
    calls.add(0, arguments_delta=": 1}")
    assert calls.finish(0) == ToolCall(index=0, id="call_1", name="get_weather", arguments={"a": 1})
    assert not calls.pending


@pytest.mark.parametrize("arguments", ["", "  "], ids=["empty", "blank"])
def test_no_arguments_is_an_empty_object(arguments: str) -> None:
    calls = ToolCallAccumulator()
    calls.add(3, id="call_x", name="now", arguments_delta=arguments)

    assert calls.finish(3).arguments == {}


def test_a_call_without_an_id_gets_one_from_its_index() -> None:
    calls = ToolCallAccumulator()
    calls.add(5, name="first")
    calls.add(2, name="now")

    assert calls.finish(2).id == "call_1"


def test_calls_are_numbered_from_0_in_the_order_they_start_whatever_the_provider_index() -> None:
    calls = ToolCallAccumulator()
    # Anthropic numbers content blocks: text is block 0, the tool calls 1 and 2.
    started = [calls.add(1, id="toolu_a", name="a"), calls.add(2, id="toolu_b", name="b")]
    fragments = [calls.add(2, arguments_delta="{}"), calls.add(1, arguments_delta="{}")]

    assert [delta.index for delta in started if delta] == [0, 1]
    assert [delta.index for delta in fragments if delta] == [1, 0]
    assert [(call.index, call.id) for call in calls.finish_all()] == [
        (0, "toolu_a"),
        (1, "toolu_b"),
    ]


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ('{"city": "Par', "not valid JSON"),
        ('{"city": "Paris"}}', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('"Paris"', "not a JSON object"),
        ("null", "not a JSON object"),
    ],
    ids=["truncated", "trailing", "array", "string", "null"],
)
def test_invalid_final_arguments_name_the_tool(arguments: str, reason: str) -> None:
    calls = ToolCallAccumulator()
    calls.add(0, id="call_1", name="get_weather", arguments_delta=arguments)

    with pytest.raises(InvalidToolArguments) as raised:
        calls.finish(0)

    assert raised.value.code == "invalid_tool_arguments"
    assert "get_weather" in raised.value.message
    assert reason in raised.value.message


def test_a_call_without_a_name_is_invalid() -> None:
    calls = ToolCallAccumulator()
    calls.add(0, id="call_1", arguments_delta="{}")

    with pytest.raises(InvalidToolArguments, match="no function name"):
        calls.finish(0)
