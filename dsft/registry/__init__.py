"""Registry of adapter versions and their compatibility with base-model versions.

Never imports torch, transformers, ``dsft.adapters`` or ``dsft.kernels``: every decision here is made
from manifests and fingerprints. See ``registry.py`` for a tour of the API.
"""
from __future__ import annotations

from dsft.registry.compat import Decision, decide, incompatibilities
from dsft.registry.integrity import Finding, check_files
from dsft.registry.records import AdapterRecord, BaseRecord, CompatRecord, TagMove
from dsft.registry.refs import Ref, parse_ref, validate_domain, validate_tag, validate_version
from dsft.registry.registry import Registry, VerifyReport, open_registry
from dsft.registry.transaction import Transaction
from dsft.registry.versions import Version, next_version

__all__ = [
    "AdapterRecord",
    "BaseRecord",
    "CompatRecord",
    "Decision",
    "Finding",
    "Ref",
    "TagMove",
    "Registry",
    "Transaction",
    "Version",
    "VerifyReport",
    "check_files",
    "decide",
    "incompatibilities",
    "next_version",
    "open_registry",
    "parse_ref",
    "validate_domain",
    "validate_tag",
    "validate_version",
]
