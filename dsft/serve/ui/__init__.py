"""A web page for the registry: server-rendered HTML over :class:`dsft.registry.Registry` (no JavaScript build).

    GET  /ui                              adapters: every version with its tags, base and compatibility summary
    GET  /ui/compat                       the matrix of adapter versions x registered base versions, with reasons
    GET  /ui/adapters/{domain}/{version}  one version: metrics, evaluations, training curve, data plan, recipe
    POST /ui/adapters/{domain}/tags       set or remove a tag (only when started with an API key, sent in the form)

``dsft ui`` serves these pages alone (no model is loaded); ``dsft serve --ui`` adds them to the API server.
``views`` gathers what a page shows (registry reads, adapter files), ``render`` turns it into HTML (every value
escaped: names, tags and reasons come from users), ``app`` holds the routes.
"""
from __future__ import annotations
