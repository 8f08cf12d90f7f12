"""Plugins for relay: installed as ``relay_plugins``; most are on by their flags (``python relay.py --help``).

The hooks they can implement are documented in ``docs/plugins.md`` and defined in ``relay.HookSpecs``.
"""
