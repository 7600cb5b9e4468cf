"""Where adapters come from: adapter ids -> a local folder, with access checks.

Three sources as in LoRAX, and MLflow (``mlflow``: ``models:/`` and ``runs:/`` URIs, see
`lorax_mlflow.adapters.mlflow_source`):

- ``hub``: a Hugging Face Hub repo (``org/name`` or ``org/name@revision``), fetched with
  `huggingface_hub.snapshot_download` into its own cache (so ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``
  and a prefilled cache work as usual). Private and gated repos need the request's token, and
  that is checked on every request, also when the adapter is already cached: the disk and memory
  caches must never hand a private adapter to a request that could not download it itself.
- ``s3``: every object under ``s3://bucket/prefix``, fetched with boto3 (credentials and
  ``AWS_ENDPOINT_URL`` from the usual environment) into ``download_dir/s3/bucket/prefix``.
- ``local``: a folder inside one of the configured adapter roots. Paths are resolved (symlinks,
  ``..``) before the check, and nothing outside the roots is ever read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from lorax_mlflow.adapters.mlflow_source import MlflowAdapters, check_mlflow_uri, is_mlflow_uri
from lorax_mlflow.errors import (
    AdapterAuthError,
    AdapterForbiddenError,
    AdapterNotFoundError,
    EngineUnavailableError,
    InvalidRequestError,
    LoraxError,
)

logger = logging.getLogger(__name__)

AdapterSource = Literal["hub", "local", "s3", "mlflow"]
ADAPTER_SOURCES: tuple[AdapterSource, ...] = ("hub", "local", "s3", "mlflow")
DEFAULT_MAX_ADAPTER_BYTES = 4 << 30
"""Largest adapter (all its files) that is downloaded from MLflow."""

HUB_ADAPTER_FILES = [
    "adapter_config.json",
    "adapter_model.*",
    "config.json",
    "medusa_lm_head.*",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.model",
]
"""What is downloaded from a hub repo: the adapter (LoRA and/or Medusa heads), and its own tokenizer/chat
template if any."""

_HUB_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_S3_MANIFEST = ".lorax-s3-etags.json"


@dataclass(frozen=True)
class AdapterLocation:
    source: AdapterSource
    path: str
    """Hub repo id, local path (as given; resolved by `AdapterSources`), s3 URI, or MLflow URI."""
    revision: str | None = None


def parse_adapter_id(adapter_id: str, adapter_source: str | None = None) -> AdapterLocation:
    """Tell where an adapter id points; an explicit `adapter_source` wins over the id's shape.

    Without one: ``s3://...`` is S3; ``models:/...`` and ``runs:/...`` are MLflow; a path starting with ``/``, ``./``, ``../`` or ``~`` is
    local; anything else must be a hub repo id, optionally with ``@revision``.
    """
    if not isinstance(adapter_id, str) or not adapter_id.strip():
        raise InvalidRequestError("adapter id must be a non-empty string", param="adapter_id")
    if adapter_source not in (None, "", *ADAPTER_SOURCES):
        raise InvalidRequestError(
            f"adapter_source must be one of {list(ADAPTER_SOURCES)}, got {adapter_source!r}",
            param="adapter_source",
        )
    source = adapter_source or _guess_source(adapter_id)
    if source == "s3":
        _split_s3_uri(adapter_id)  # validates
        return AdapterLocation("s3", adapter_id)
    if source == "local":
        return AdapterLocation("local", adapter_id)
    if source == "mlflow":
        check_mlflow_uri(adapter_id)
        return AdapterLocation("mlflow", adapter_id)
    repo_id, _, revision = adapter_id.partition("@")
    if not _is_hub_repo_id(repo_id) or (revision == "" and "@" in adapter_id):
        raise InvalidRequestError(
            f"{adapter_id!r} is not a hub repo id (org/name[@revision]), an s3:// URI or a local path",
            param="adapter_id",
        )
    return AdapterLocation("hub", repo_id, revision or None)


def _guess_source(adapter_id: str) -> AdapterSource:
    if adapter_id.startswith("s3://"):
        return "s3"
    if is_mlflow_uri(adapter_id):
        return "mlflow"
    if adapter_id.startswith(("/", "./", "../", "~")) or adapter_id in (".", ".."):
        return "local"
    return "hub"


def _is_hub_repo_id(repo_id: str) -> bool:
    return bool(_HUB_REPO_ID.match(repo_id)) and ".." not in repo_id and "--" not in repo_id and len(repo_id) <= 96


def _split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, ``some/prefix``), refusing prefixes that climb out."""
    if not uri.startswith("s3://"):
        raise InvalidRequestError(f"{uri!r} is not an s3:// URI", param="adapter_id")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    parts = PurePosixPath(prefix).parts if prefix else ()
    if not bucket or any(part in (".", "..") for part in parts) or prefix.startswith("/"):
        raise InvalidRequestError(f"{uri!r} is not a valid s3://bucket/prefix URI", param="adapter_id")
    return bucket, "/".join(parts)


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AdapterSources:
    """Fetches adapters to local folders and decides whether a request may use them.

    Thread-safe: requests call `check_access` concurrently; fetches run off the engine thread.
    """

    def __init__(
        self,
        adapter_roots: Sequence[str | Path],
        download_dir: str | Path,
        *,
        use_global_hf_token: bool | None = None,
        hf_cache_dir: str | Path | None = None,
        hub_endpoint: str | None = None,
        hub_offline: bool | None = None,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    ) -> None:
        """`hf_cache_dir` None = huggingface_hub's cache; `hub_endpoint` None = ``HF_ENDPOINT`` (read
        now) or the library's default; `hub_offline` None = ``HF_HUB_OFFLINE`` (read now) or the
        library's setting. `use_global_hf_token` None = ``LORAX_USE_GLOBAL_HF_TOKEN == "1"``."""
        from huggingface_hub import constants

        self.adapter_roots = [Path(root).expanduser().resolve() for root in adapter_roots]
        self.download_dir = Path(download_dir)
        if use_global_hf_token is None:
            use_global_hf_token = os.environ.get("LORAX_USE_GLOBAL_HF_TOKEN") == "1"
        self.use_global_hf_token = use_global_hf_token
        self.hf_cache_dir = str(hf_cache_dir) if hf_cache_dir is not None else None
        self.hub_endpoint = hub_endpoint or os.environ.get("HF_ENDPOINT") or None
        if hub_offline is None:
            offline_env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
            hub_offline = constants.is_offline_mode() or offline_env
        self.hub_offline = hub_offline
        self.mlflow = MlflowAdapters(self.download_dir, max_adapter_bytes)
        self._lock = threading.Lock()
        self._s3_lock = threading.Lock()
        self._public_repos: set[str] = set()
        self._private_repos: set[str] = set()
        self._verified_tokens: dict[str, set[str]] = {}
        """repo id -> sha256 of the tokens the hub accepted for it."""

    # --- access -----------------------------------------------------------------------------------

    def check_access(self, location: AdapterLocation, api_token: str | None) -> None:
        """Raise unless this request may use the adapter; called on every request.

        The first time a hub repo is seen it is classified with an anonymous check: public repos
        need no token from then on. For the others the request's token (or the global HF token,
        only when allowed) must be one the hub accepted for that repo; accepted tokens are
        remembered by digest, so cached adapters cost no hub round trip. With the hub offline
        only what was learned while online can be enforced: a repo known to be private still
        needs a token verified earlier, anything else is served from the cache.
        """
        if location.source != "hub":
            return
        repo_id = location.path
        token = self._effective_token(api_token)
        with self._lock:
            if repo_id in self._public_repos:
                return
            if token is not None and _token_digest(token) in self._verified_tokens.get(repo_id, set()):
                return
            known_private = repo_id in self._private_repos
        if self.hub_offline:
            if known_private:
                raise (AdapterForbiddenError if token else AdapterAuthError)(
                    f"adapter {repo_id!r} is private and the hub is offline: only tokens verified earlier are accepted"
                )
            return
        if not known_private:
            try:
                self._ask_hub(repo_id, None)
            except AdapterAuthError:
                with self._lock:
                    self._private_repos.add(repo_id)
                if token is None:
                    raise
            else:
                with self._lock:
                    self._public_repos.add(repo_id)
                return
        if token is None:
            raise AdapterAuthError(f"adapter {repo_id!r} is private or gated: pass an api_token that can read it")
        self._ask_hub(repo_id, token)
        with self._lock:
            self._verified_tokens.setdefault(repo_id, set()).add(_token_digest(token))

    def _ask_hub(self, repo_id: str, token: str | None) -> None:
        """Ask the hub whether `token` (None: anonymous) may read `repo_id`."""
        from huggingface_hub import HfApi

        try:
            HfApi(endpoint=self.hub_endpoint).auth_check(repo_id, token=token or False)
        except Exception as exc:  # HTTP errors and connection failures alike become request errors
            raise self._hub_error(repo_id, None, token, exc) from exc

    def _effective_token(self, api_token: str | None) -> str | None:
        if api_token:
            return api_token
        if self.use_global_hf_token:
            from huggingface_hub import get_token

            return get_token()
        return None

    def pin(self, location: AdapterLocation) -> AdapterLocation:
        """The location of the content the id names right now: an MLflow alias becomes its version.

        Called on every request, before the cache key is taken from the location.
        """
        if location.source == "mlflow":
            return AdapterLocation("mlflow", self.mlflow.pin(location.path))
        return location

    # --- fetching ---------------------------------------------------------------------------------

    def fetch(self, location: AdapterLocation, api_token: str | None = None) -> Path:
        """Return a local folder holding the adapter (downloading it if needed)."""
        if location.source == "local":
            return self.resolve_local(location.path)
        if location.source == "s3":
            folder = self._fetch_s3(location.path)
        elif location.source == "mlflow":
            folder = self.mlflow.fetch(self.mlflow.pin(location.path))
        else:
            self.check_access(location, api_token)
            # A public repo is fetched anonymously: clients such as the OpenAI SDK always send some
            # bearer token ("EMPTY"), which the hub would reject.
            token = None if location.path in self._public_repos else self._effective_token(api_token)
            folder = self._fetch_hub(location, token)
        logger.info("adapter %s (%s) is in %s", location.path, location.source, folder)
        return folder

    def resolve_local(self, path: str) -> Path:
        """The resolved folder for a local adapter path, if it lies inside an adapter root.

        Relative paths are taken relative to each root in turn. The containment check runs on
        the fully resolved path (symlinks and ``..`` followed), before anything is read.
        """
        given = Path(path).expanduser()
        candidates = [given] if given.is_absolute() else [root / given for root in self.adapter_roots]
        inside_roots = [
            resolved
            for resolved in (candidate.resolve(strict=False) for candidate in candidates)
            if any(resolved.is_relative_to(root) for root in self.adapter_roots)
        ]
        if not inside_roots:
            raise InvalidRequestError(
                f"local adapter {path!r} is outside the configured adapter roots", param="adapter_id"
            )
        for resolved in inside_roots:
            if resolved.is_dir():
                return resolved
        raise AdapterNotFoundError(f"local adapter {path!r} not found", param="adapter_id")

    def _fetch_hub(self, location: AdapterLocation, token: str | None) -> Path:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(
                location.path,
                revision=location.revision,
                cache_dir=self.hf_cache_dir,
                endpoint=self.hub_endpoint,
                token=token or False,
                allow_patterns=HUB_ADAPTER_FILES,
                local_files_only=self.hub_offline,
            )
        except Exception as exc:  # huggingface_hub raises HTTP, OS and value errors
            raise self._hub_error(location.path, location.revision, token, exc) from exc
        return Path(folder)

    def _hub_error(self, repo_id: str, revision: str | None, token: str | None, exc: Exception) -> LoraxError:
        """Translate a huggingface_hub failure into the request error it means."""
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
        denied = AdapterForbiddenError if token else AdapterAuthError
        how = "the token was rejected" if token else "pass an api_token that can read it"
        if isinstance(exc, GatedRepoError):
            return denied(f"adapter {repo_id!r} is a gated repo: {how}")
        if isinstance(exc, RevisionNotFoundError):
            return AdapterNotFoundError(f"adapter {repo_id!r} has no revision {revision!r}")
        if isinstance(exc, RepositoryNotFoundError) and status == 404:
            suffix = " (or the token cannot read it)" if token else ""
            return AdapterNotFoundError(f"adapter {repo_id!r} not found on the hub{suffix}")
        if status in (401, 403):
            if token:
                return AdapterForbiddenError(f"adapter {repo_id!r}: the hub rejected the token")
            return AdapterAuthError(
                f"adapter {repo_id!r} was not found or is private: pass an api_token that can read it"
            )
        if isinstance(exc, LocalEntryNotFoundError):
            return AdapterNotFoundError(
                f"adapter {repo_id!r}{'@' + revision if revision else ''} is not in the local hub cache "
                "and the hub cannot be reached"
            )
        return EngineUnavailableError(f"cannot use the hub for adapter {repo_id!r}: {exc}")

    def _fetch_s3(self, uri: str) -> Path:
        """Mirror every object under the prefix, skipping files already there with the same ETag."""
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        bucket, prefix = _split_s3_uri(uri)
        target = (self.download_dir / "s3" / bucket / prefix).resolve()
        key_prefix = f"{prefix}/" if prefix else ""
        try:
            client = boto3.client("s3")
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
            objects = [obj for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
            if not objects:
                raise AdapterNotFoundError(f"adapter {uri!r}: no objects under this S3 prefix")
            with self._s3_lock:
                _mirror_objects(client, bucket, key_prefix, objects, target)
        except ClientError as exc:
            raise _s3_error(uri, exc) from exc
        except NoCredentialsError as exc:
            raise EngineUnavailableError(f"adapter {uri!r}: the server has no AWS credentials configured") from exc
        except BotoCoreError as exc:
            raise EngineUnavailableError(f"adapter {uri!r}: cannot reach S3: {exc}") from exc
        return target

def _mirror_objects(client, bucket: str, key_prefix: str, objects: list[dict], target: Path) -> None:
    """Download `objects` into `target`, skipping files whose size and ETag are unchanged.

    ETags of downloaded files live in a manifest next to them; files this mirror downloaded
    earlier that are no longer in the bucket are removed, so a replaced weights format cannot
    shadow the new one.
    """
    manifest_path = target / _S3_MANIFEST
    try:
        etags: dict[str, str] = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        etags = {}
    target.mkdir(parents=True, exist_ok=True)
    listed = set()
    for obj in objects:
        relative = obj["Key"][len(key_prefix):]
        destination = (target / relative).resolve()
        if not destination.is_relative_to(target) or destination == manifest_path:
            raise AdapterNotFoundError(f"S3 object {obj['Key']!r} cannot be stored inside the adapter folder")
        listed.add(relative)
        if destination.is_file() and destination.stat().st_size == obj["Size"] and etags.get(relative) == obj["ETag"]:
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        client.download_file(bucket, obj["Key"], str(partial))
        os.replace(partial, destination)
        etags[relative] = obj["ETag"]
    for stale in set(etags) - listed:
        (target / stale).unlink(missing_ok=True)
        del etags[stale]
    manifest_path.write_text(json.dumps(etags))


def _s3_error(uri: str, exc: Exception) -> LoraxError:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code in ("NoSuchBucket", "NoSuchKey", "404"):
        return AdapterNotFoundError(f"adapter {uri!r} not found on S3 ({code})")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return AdapterForbiddenError(f"adapter {uri!r}: the server's AWS credentials cannot read it ({code})")
    return EngineUnavailableError(f"adapter {uri!r}: S3 error {code}: {exc}")
