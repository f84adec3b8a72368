"""Adapters that let agent frameworks run their code in moat sandboxes.

Each lives in a module of its own and needs its framework installed; none is imported here, so
``import moat`` never needs them. ``moat.integrations.adk`` is for Google's Agent Development Kit.
"""
