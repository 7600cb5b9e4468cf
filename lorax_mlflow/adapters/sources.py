"""Where adapters come from: adapter ids -> a local folder, with access checks.

Three sources as in LoRAX, and MLflow (``mlflow``: ``models:/`` and ``runs:/`` URIs, see
`lorax_mlflow.adapters.mlflow_source`):

- ``hub``: a Hugging Face Hub repo (``org/name`` or ``org/name@revision``), fetched with
  `huggingface_hub.snapshot_download` into its own cache (so ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``
  and a prefilled cache work as usual). Private and gated repos need the request's token, and
  that is checked on every request, also when the adapter is already cached: the disk and memory
  caches must never hand a private adapter to a request that could not download it itself.
  Privacy fails closed: a repo whose access state is unknown (the hub offline, never checked)
  is not served without a check. What the hub said about each repo is persisted next to the
  downloads, so an offline restart still knows a private repo is private; tokens the hub accepted
  are remembered by digest for `verified_token_ttl_s` only.
- ``s3``: every object under ``s3://bucket/prefix``, fetched with boto3 (credentials and
  ``AWS_ENDPOINT_URL`` from the usual environment) into ``download_dir/s3/bucket/prefix``. Only
  prefixes under an operator-configured allowlist (`s3_allow`; empty = S3 off), never a whole
  bucket, and at most `max_adapter_bytes` per adapter.
- ``local``: a folder inside one of the configured adapter roots. Paths are resolved (symlinks,
  ``..``) before the check, and so is every file in the folder before it is opened
  (`lorax_mlflow.adapters.confined`): nothing outside the roots is ever read.

Every adapter has one canonical location (resolved path, ``repo@revision``, normalised S3 URI), so
different spellings of one adapter share one cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorax_mlflow.adapters.confined import ConfinedFolder, resolve_path
from lorax_mlflow.adapters.mlflow_source import MlflowAdapters, check_mlflow_uri, is_mlflow_uri
from lorax_mlflow.errors import (
    AdapterAuthError,
    AdapterForbiddenError,
    AdapterNotFoundError,
    EngineUnavailableError,
    AdapterValidationError,
    InvalidRequestError,
    LoraxError,
)

logger = logging.getLogger(__name__)

AdapterSource = Literal["hub", "local", "s3", "mlflow"]
ADAPTER_SOURCES: tuple[AdapterSource, ...] = ("hub", "local", "s3", "mlflow")
DEFAULT_MAX_ADAPTER_BYTES = 4 << 30
"""Largest adapter (all its files) that one download (MLflow, S3) may fetch."""

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
_HUB_ACCESS_FILE = "hub-access.json"
DEFAULT_TOKEN_TTL_S = 600.0
_MAX_NAME_BYTES = 255


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
    check_adapter_source(adapter_source)
    source = adapter_source or _guess_source(adapter_id)
    if source == "s3":
        return AdapterLocation("s3", canonical_s3_uri(adapter_id))
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


def check_adapter_source(adapter_source: str | None) -> None:
    """The one check of `adapter_source`. `AdapterRequest` runs it, so a request naming the base
    model with a bad source is refused too; `parse_adapter_id` runs it for its direct callers."""
    if adapter_source not in (None, "", *ADAPTER_SOURCES):
        raise InvalidRequestError(
            f"adapter_source must be one of {list(ADAPTER_SOURCES)}, got {adapter_source!r}",
            param="adapter_source",
        )


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


def _split_s3_uri(uri: str, *, allow_empty_prefix: bool = False) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, ``some/prefix``), refusing prefixes that climb out
    and (unless allowed) an empty prefix, which would mirror the whole bucket."""
    if not uri.startswith("s3://"):
        raise InvalidRequestError(f"{uri!r} is not an s3:// URI", param="adapter_id")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    raw_parts = prefix.split("/") if prefix else []
    parts = [part for part in raw_parts if part not in ("", ".")]
    if not bucket or ".." in raw_parts or prefix.startswith("/") or "\x00" in uri:
        raise InvalidRequestError(f"{uri!r} is not a valid s3://bucket/prefix URI", param="adapter_id")
    if not parts and not allow_empty_prefix:
        raise InvalidRequestError(
            f"{uri!r} names a whole bucket: an S3 adapter id must be s3://bucket/prefix", param="adapter_id"
        )
    return bucket, "/".join(parts)


def canonical_s3_uri(uri: str) -> str:
    bucket, prefix = _split_s3_uri(uri)
    return f"s3://{bucket}/{prefix}"


def _s3_allowed(bucket: str, prefix: str, allow: Sequence[tuple[str, str]]) -> bool:
    """Whether `prefix` of `bucket` lies under one allowlist entry, comparing whole path components."""
    parts = prefix.split("/")
    for allowed_bucket, allowed_prefix in allow:
        allowed_parts = allowed_prefix.split("/") if allowed_prefix else []
        if bucket == allowed_bucket and parts[: len(allowed_parts)] == allowed_parts:
            return True
    return False


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class HubAccessRecord:
    """What the hub said about each repo ("public" / "private"), persisted as JSON next to the downloads.

    Read when the hub is offline: a repo recorded private stays private across restarts, and one
    never recorded has an unknown access state (so it is not served). Thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            data = json.loads(path.read_text())
            self._states: dict[str, str] = {
                str(k): v for k, v in data.items() if v in ("public", "private")
            } if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._states = {}

    def get(self, repo_id: str) -> str | None:
        with self._lock:
            return self._states.get(repo_id)

    def set(self, repo_id: str, state: str) -> None:
        with self._lock:
            if self._states.get(repo_id) == state:
                return
            self._states[repo_id] = state
            snapshot = json.dumps(self._states, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.partial")
            partial.write_text(snapshot)
            os.replace(partial, self.path)
        except OSError as error:  # a read-only cache: the state is still enforced in memory
            logger.warning("cannot persist hub access states to %s: %s", self.path, error)


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
        s3_allow: Sequence[str] = (),
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        verified_token_ttl_s: float = DEFAULT_TOKEN_TTL_S,
    ) -> None:
        """`hf_cache_dir` None = huggingface_hub's cache; `hub_endpoint` None = ``HF_ENDPOINT`` (read
        now) or the library's default; `hub_offline` None = ``HF_HUB_OFFLINE`` (read now) or the
        library's setting. `use_global_hf_token` None = ``LORAX_USE_GLOBAL_HF_TOKEN == "1"``.
        `s3_allow`: ``s3://bucket[/prefix]`` entries S3 adapters must lie under (empty: S3 is off).
        `verified_token_ttl_s`: how long a token the hub accepted (or a repo it said was public)
        is trusted before it is checked again."""
        from huggingface_hub import constants

        self.adapter_roots = [resolve_path(Path(root), param="adapter_roots") for root in adapter_roots]
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
        self.s3_allow = [_split_s3_uri(entry, allow_empty_prefix=True) for entry in s3_allow]
        self.max_adapter_bytes = max_adapter_bytes
        self.verified_token_ttl_s = verified_token_ttl_s
        self.access_record = HubAccessRecord(self.download_dir / _HUB_ACCESS_FILE)
        self._lock = threading.Lock()
        self._s3_lock = threading.Lock()
        self._public_until: dict[str, float] = {}
        """repo id -> when its anonymous "public" check expires (monotonic seconds)."""
        self._private_repos: set[str] = set()
        self._verified_tokens: dict[str, dict[str, float]] = {}
        """repo id -> sha256 of a token the hub accepted for it -> when that expires."""

    @property
    def hub_cache_root(self) -> Path:
        from huggingface_hub import constants

        return resolve_path(Path(self.hf_cache_dir or constants.HF_HUB_CACHE))

    def root_for(self, folder: Path) -> Path:
        """The root that every file of `folder` must resolve under: the adapter root, hub cache or
        download dir holding it, else the folder itself (packaged adapters)."""
        resolved = resolve_path(Path(folder))
        for root in (*self.adapter_roots, self.hub_cache_root, resolve_path(self.download_dir)):
            if resolved.is_relative_to(root):
                return root
        return resolved

    # --- access -----------------------------------------------------------------------------------

    def check_access(self, location: AdapterLocation, api_token: str | None) -> None:
        """Raise unless this request may use the adapter; called on every request.

        The first time a hub repo is seen (and again once the check is older than the TTL) it is
        classified with an anonymous check: public repos need no token until then. For the others
        the request's token (or the global HF token, only when allowed) must be one the hub
        accepted for that repo within the TTL; accepted tokens are remembered by digest, so
        cached adapters cost no hub round trip. With the hub offline nothing can be checked, so
        access fails closed: only a repo recorded public, or a token verified within the TTL,
        opens a cached adapter; an unknown repo is refused.
        """
        if location.source != "hub":
            return
        repo_id = location.path
        token = self._effective_token(api_token)
        now = time.monotonic()
        with self._lock:
            if self._public_until.get(repo_id, 0.0) > now:
                return
            if token is not None and self._verified_tokens.get(repo_id, {}).get(_token_digest(token), 0.0) > now:
                return
            known_private = repo_id in self._private_repos
        if self.hub_offline:
            self._check_offline(location, token, known_private)
            return
        if not known_private:
            try:
                self._ask_hub(location, None)
            except AdapterAuthError:
                with self._lock:
                    self._private_repos.add(repo_id)
                self.access_record.set(repo_id, "private")
                if token is None:
                    raise
            else:
                with self._lock:
                    self._public_until[repo_id] = now + self.verified_token_ttl_s
                self.access_record.set(repo_id, "public")
                return
        if token is None:
            raise AdapterAuthError(f"adapter {repo_id!r} is private or gated: pass an api_token that can read it")
        self._ask_hub(location, token)
        with self._lock:
            self._verified_tokens.setdefault(repo_id, {})[_token_digest(token)] = now + self.verified_token_ttl_s

    def _check_offline(self, location: AdapterLocation, token: str | None, known_private: bool) -> None:
        repo_id = location.path
        if not self._in_hub_cache(location):
            raise self._not_cached(location, "HF_HUB_OFFLINE is set, so the hub is not asked")
        state = "private" if known_private else self.access_record.get(repo_id)
        if state == "public":
            return
        denied = AdapterForbiddenError if token else AdapterAuthError
        if state == "private":
            raise denied(f"adapter {repo_id!r} is private and the hub is offline: only tokens verified "
                         "within the last check interval are accepted")
        raise denied(f"adapter {repo_id!r}: its access state is unknown and the hub is offline, so it "
                     "is not served (it has never been checked with the hub)")

    def _in_hub_cache(self, location: AdapterLocation) -> bool:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(
                location.path, "adapter_config.json", cache_dir=self.hf_cache_dir, revision=location.revision
            )
        except Exception:  # an unusual revision string or a broken cache: not usable either way
            return False
        return isinstance(cached, str)

    def _not_cached(self, location: AdapterLocation, why: str) -> AdapterNotFoundError:
        revision = f"@{location.revision}" if location.revision else ""
        return AdapterNotFoundError(
            f"adapter {location.path + revision!r} is not in the local hub cache ({self.hub_cache_root}) "
            f"and {why}"
        )

    def _ask_hub(self, location: AdapterLocation, token: str | None) -> None:
        """Ask the hub whether `token` (None: anonymous) may read the repo."""
        from huggingface_hub import HfApi

        try:
            HfApi(endpoint=self.hub_endpoint).auth_check(location.path, token=token or False)
        except Exception as exc:  # HTTP errors and connection failures alike become request errors
            raise self._hub_error(location, token, exc) from exc

    def _effective_token(self, api_token: str | None) -> str | None:
        if api_token:
            return api_token
        if self.use_global_hf_token:
            from huggingface_hub import get_token

            return get_token()
        return None

    def pin(self, location: AdapterLocation) -> AdapterLocation:
        """The one canonical location of the content the id names right now: a local path resolved
        (so every spelling of it is one adapter), an MLflow alias turned into its version.

        Called on every request, before the cache key is taken from the location.
        """
        if location.source == "local":
            return AdapterLocation("local", str(self.resolve_local(location.path)))
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
            with self._lock:
                public = location.path in self._public_until
            token = None if public else self._effective_token(api_token)
            folder = self._fetch_hub(location, token)
        logger.info("adapter %s (%s) is in %s", location.path, location.source, folder)
        return folder

    def resolve_local(self, path: str) -> Path:
        """The resolved folder for a local adapter path, if it lies inside an adapter root.

        Relative paths are taken relative to each root in turn. The containment check runs on
        the fully resolved path (symlinks and ``..`` followed), before anything is read, and
        every file in the folder must resolve inside the same root.
        """
        if "\x00" in path:
            raise InvalidRequestError("a local adapter path must not contain NUL bytes", param="adapter_id")
        if any(len(part.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES for part in path.split("/")):
            raise InvalidRequestError(
                f"local adapter path has a component longer than {_MAX_NAME_BYTES} bytes", param="adapter_id"
            )
        given = Path(path)
        if path.startswith("~"):
            given = resolve_path(given)  # a 400 for an unknown ~user
        candidates = [given] if given.is_absolute() else [root / given for root in self.adapter_roots]
        inside_roots = []
        for candidate in candidates:
            resolved = resolve_path(candidate)
            root = next((root for root in self.adapter_roots if resolved.is_relative_to(root)), None)
            if root is not None:
                inside_roots.append((resolved, root))
        if not inside_roots:
            raise InvalidRequestError(
                f"local adapter {path!r} is outside the configured adapter roots", param="adapter_id"
            )
        for resolved, root in inside_roots:
            try:
                is_dir = resolved.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                ConfinedFolder(resolved, root).check_entries()
                return resolved
        roots = ", ".join(str(root) for root in self.adapter_roots)
        raise AdapterNotFoundError(f"local adapter {path!r} not found under the adapter roots ({roots})",
                                   param="adapter_id")

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
            raise self._hub_error(location, token, exc) from exc
        return Path(folder)

    def _hub_error(self, location: AdapterLocation, token: str | None, exc: Exception) -> LoraxError:
        """Translate a huggingface_hub failure into the request error it means."""
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo_id, revision = location.path, location.revision
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
            return self._not_cached(location, "the hub cannot be reached")
        if status is None and not self._in_hub_cache(location):
            # No hub answer (no network, DNS failure): an adapter that is not cached here does not exist
            # for this server, which is what the client needs to know (not a retryable 503).
            return self._not_cached(location, f"the hub cannot be reached ({type(exc).__name__})")
        return EngineUnavailableError(f"cannot use the hub for adapter {repo_id!r}: {type(exc).__name__}")

    def _fetch_s3(self, uri: str) -> Path:
        """Mirror every object under the prefix, skipping files already there with the same ETag."""
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        bucket, prefix = _split_s3_uri(uri)
        if not _s3_allowed(bucket, prefix, self.s3_allow):
            allowed = ", ".join(f"s3://{b}/{p}".rstrip("/") for b, p in self.s3_allow)
            raise AdapterForbiddenError(
                f"adapter {uri!r} is not under an allowed S3 prefix "
                f"({allowed or 'S3 adapters are off: the operator allows prefixes with --s3-allow'})",
                param="adapter_id",
            )
        target = (self.download_dir / "s3" / bucket / prefix).resolve()
        key_prefix = f"{prefix}/"
        try:
            client = boto3.client("s3")
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
            objects = [obj for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
            if not objects:
                raise AdapterNotFoundError(f"adapter {uri!r}: no objects under this S3 prefix")
            total = sum(int(obj.get("Size", 0)) for obj in objects)
            if total > self.max_adapter_bytes:
                raise AdapterValidationError(
                    f"adapter {uri!r} holds {total} bytes, above the per-adapter download limit of "
                    f"{self.max_adapter_bytes} bytes", param="adapter_id",
                )
            with self._s3_lock:
                _mirror_objects(client, bucket, key_prefix, objects, target)
        except ClientError as exc:
            raise _s3_error(uri, exc) from exc
        except NoCredentialsError as exc:
            raise EngineUnavailableError(f"adapter {uri!r}: the server has no AWS credentials configured") from exc
        except BotoCoreError as exc:
            raise EngineUnavailableError(f"adapter {uri!r}: cannot reach S3: {type(exc).__name__}") from exc
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
    return EngineUnavailableError(f"adapter {uri!r}: S3 error {code}")
