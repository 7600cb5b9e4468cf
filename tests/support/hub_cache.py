"""Prefill a Hugging Face Hub cache folder by hand, in the layout huggingface_hub reads offline:

    models--org--name/blobs/<hash>                    file contents
    models--org--name/snapshots/<commit>/<file>       symlink -> ../../blobs/<hash>
    models--org--name/refs/<branch or tag>            the commit hash
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path


def add_commit(cache_dir: Path, repo_id: str, files: dict[str, bytes], *, refs: Sequence[str] = ()) -> str:
    """Store one commit of `repo_id` with `files`, point `refs` at it, and return its hash."""
    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    digest = hashlib.sha1(repo_id.encode())
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + data)
    commit = digest.hexdigest()
    snapshot = repo_folder / "snapshots" / commit
    (repo_folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob_hash = hashlib.sha256(data).hexdigest()
        (repo_folder / "blobs" / blob_hash).write_bytes(data)
        os.symlink(Path("..", "..", "blobs", blob_hash), snapshot / name)
    for ref in refs:
        (repo_folder / "refs").mkdir(exist_ok=True)
        (repo_folder / "refs" / ref).write_text(commit)
    return commit


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
