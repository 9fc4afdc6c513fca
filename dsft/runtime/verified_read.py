"""Adapter files read once into memory and checked against the manifest while the caller parses them.

What is loaded is exactly what was verified: a file's bytes are hashed, not re-read, and the caller
calls ``verified()`` before anything parsed from them is used (the parser bounds-checks any input, so
parsing may start before the hash is done: :mod:`dsft.runtime.tensor_file`). The bytes land in an
uninitialised buffer (a ``bytearray`` would be zeroed page by page on one thread first). Two ways to check,
by what the manifest holds:

- ``files`` only: one sha256 of the whole file, computed on one worker thread chunk by chunk as the file
  is read. A sha256 is sequential: about 0.8 s for the 900 MB of a lite-shape adapter.
- ``file_blocks`` as well (schema 2, files larger than one block): the blocks are read by a pool of threads
  (an attach on the H200 host read 900 MB in 0.48 s on one thread into a zeroed buffer, 0.58 s on eight), then
  each block's sha256 is computed on the pool (hashlib releases the GIL) while the caller parses.
  The file must have exactly the recorded number of blocks, so a truncated or extended file fails.
  Block digests are as trusted as ``files``: both come from the registry's copy of the manifest and
  were computed from one read of each file when the adapter was registered.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dsft.adapter_format import ESFT_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, TERMS_FILE, Manifest
from dsft.errors import IntegrityError

VERIFIED_ON_READ = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, TERMS_FILE, ESFT_FILE)
"""The files :func:`dsft.runtime.weights.read_adapter` hashes as it reads them (an attach need not hash
them beforehand)."""

READ_CHUNK = 64 << 20
HASH_WORKERS = min(8, os.cpu_count() or 1)
"""Threads hashing one file's blocks: past 8, reading the file costs more than hashing it."""


def read_verified(directory: Path, manifest: Manifest, name: str) -> bytes:
    """The bytes of ``directory/name``, refused unless they match the manifest's sha256.

    Raises:
        IntegrityError: the file is not listed, missing, or its content differs.
    """
    data, verified = read_hashing(directory, manifest, name)
    verified()
    return data.numpy().tobytes()


def read_hashing(directory: Path, manifest: Manifest, name: str) -> tuple[torch.Tensor, Callable[[], None]]:
    """The bytes of ``directory/name`` (read once, as a uint8 CPU tensor), and ``verified()``: returns once
    they matched the manifest's digests (its block digests when it has some for the file, else its sha256),
    raises :class:`IntegrityError` if they did not.

    The hashing runs on worker threads, so the caller can parse the bytes meanwhile; it must call
    ``verified()`` before anything parsed from them is used.

    Raises:
        IntegrityError: the file is not listed or missing.
    """
    digest = manifest.files.get(name)
    if digest is None:
        raise IntegrityError(f"adapter {directory}: {name} is not listed in its manifest; re-import the adapter")
    path = directory / name
    blocks = manifest.blocks(name)
    try:
        data, matched = _read_sequential(path, digest) if blocks is None else _read_blocks(path, *blocks)
    except FileNotFoundError:
        raise IntegrityError(f"adapter file {path} is missing; restore it, or re-import / retrain the adapter") from None

    def verified() -> None:
        if not matched():
            raise IntegrityError(f"adapter file {path} does not match its recorded sha256 (changed or truncated); "
                                 "refusing to load it")
    return data, verified


def _buffer(size: int) -> tuple[torch.Tensor, memoryview]:
    """An uninitialised buffer of ``size`` bytes and a writable view of it. Not a ``bytearray``: that is zeroed
    page by page on one thread before the read (0.6 s for 900 MB on a 2-core machine, about the read's own
    time); untouched pages are faulted in by the threads that read into them."""
    data = torch.empty(size, dtype=torch.uint8)
    return data, memoryview(data.numpy()) if size else memoryview(bytearray())


def _read_sequential(path: Path, digest: str) -> tuple[torch.Tensor, Callable[[], bool]]:
    h = hashlib.sha256()
    pool = ThreadPoolExecutor(1)  # one worker: the chunks are hashed in order
    try:
        with open(path, "rb", buffering=0) as f:
            data, view = _buffer(os.fstat(f.fileno()).st_size)
            at = 0
            while at < len(data):
                got = f.readinto(view[at : at + READ_CHUNK])
                if not got:
                    break  # truncated while being read: refused by verified()
                pool.submit(h.update, view[at : at + got])
                at += got
        complete = at == len(data)
        done = pool.submit(lambda: complete and h.hexdigest() == digest)
    finally:
        pool.shutdown(wait=False)  # the worker finishes what was submitted, then exits
    return data, done.result


def _read_blocks(path: Path, block_bytes: int, digests: tuple[str, ...]) -> tuple[torch.Tensor, Callable[[], bool]]:
    pool = ThreadPoolExecutor(HASH_WORKERS)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            count = -(-size // block_bytes)
            if count != len(digests):  # truncated or extended: the blocks cannot all match
                data, view = _buffer(size)
                f.readinto(view)
                return data, lambda: False
            data, view = _buffer(size)

            def read(i: int) -> bool:  # the blocks are read by several threads: one reads the page cache at ~2 GB/s
                at, end = i * block_bytes, min(size, (i + 1) * block_bytes)
                while at < end:
                    got = os.preadv(f.fileno(), [view[at:end]], at)
                    if not got:
                        return False  # truncated while being read
                    at += got
                return True

            complete = all(pool.map(read, range(count)))

        def matches(i: int) -> bool:
            return hashlib.sha256(view[i * block_bytes : (i + 1) * block_bytes]).hexdigest() == digests[i]

        futures = [pool.submit(matches, i) for i in range(count)]
    finally:
        pool.shutdown(wait=False)  # the workers finish the hashes submitted, then exit
    return data, lambda: complete and all(f.result() for f in futures)
