"""Incident tooling over the generation log: list, export, inspect, replay, tail.

`recording` is the export file format every other tool reads; `commands`
registers the `tokentape` subcommands.
"""
