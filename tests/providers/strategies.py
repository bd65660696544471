"""Hypothesis strategies for streamed tool calls: two calls, cut anywhere, interleaved."""

from __future__ import annotations

import dataclasses
import itertools

from hypothesis import strategies as st

# Arguments as a model writes them: inner JSON escapes (\u00e9, a surrogate pair, \"),
# raw non-ASCII, nesting. Cutting them anywhere must not change the parsed result.
WEATHER_ARGUMENTS = '{"city": "Caf\\u00e9 \\ud83d\\ude00", "note": "say \\"hi\\""}'
SEARCH_ARGUMENTS = '{"q": "Zürich 😀", "n": [1, 2.5, {"k": null}], "empty": {}}'
ARGUMENTS = (WEATHER_ARGUMENTS, SEARCH_ARGUMENTS)
TOOLS = (("call_weather", "get_weather"), ("call_search", "search"))


@dataclasses.dataclass(frozen=True)
class Interleaving:
    """The order in which fragments of the two calls arrive: (call number, fragment)."""

    fragments: tuple[tuple[int, str], ...]
    # Escape non-ASCII in the provider's own JSON too (\u00fc, surrogate pairs for 😀).
    ascii_only: bool

    def last_fragment_of(self, call: int) -> int:
        return max(i for i, (number, _) in enumerate(self.fragments) if number == call)


@st.composite
def _pieces(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=len(text) - 1))))
    bounds = [0, *cuts, len(text)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


@st.composite
def interleavings(draw: st.DrawFn) -> Interleaving:
    pieces = [draw(_pieces(text)) for text in ARGUMENTS]
    order = draw(st.permutations([0] * len(pieces[0]) + [1] * len(pieces[1])))
    cursors = [0, 0]
    fragments: list[tuple[int, str]] = []
    for call in order:
        fragments.append((call, pieces[call][cursors[call]]))
        cursors[call] += 1
    return Interleaving(tuple(fragments), draw(st.booleans()))
