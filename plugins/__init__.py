"""Plugins for relay: load one with ``python relay.py --plugin plugins.<name>``.

The hooks they can implement are documented in ``docs/plugins.md`` and defined in ``relay.HookSpecs``.
"""
