"""Adapter ids -> local folders: the hub (offline cache and a live hub look-alike with private and
gated repos), S3 (a real S3-compatible server on loopback), and local folders confined to the
configured adapter roots."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import boto3
import pytest

from lorax_mlflow.adapters.sources import AdapterLocation, AdapterSources, parse_adapter_id
from lorax_mlflow.errors import (
    AdapterAuthError,
    AdapterForbiddenError,
    AdapterNotFoundError,
    AdapterValidationError,
    InvalidRequestError,
)
from tests.support.hub_cache import add_commit, folder_files
from tests.support.tiny_hub import HubRepo, TinyHub

# --- parsing ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adapter_id,source,expected",
    [
        ("org/name", None, AdapterLocation("hub", "org/name")),
        ("org/name@v1.0", None, AdapterLocation("hub", "org/name", "v1.0")),
        ("gpt2", None, AdapterLocation("hub", "gpt2")),
        ("s3://bucket/some/prefix", None, AdapterLocation("s3", "s3://bucket/some/prefix")),
        ("/srv/adapters/x", None, AdapterLocation("local", "/srv/adapters/x")),
        ("./x", None, AdapterLocation("local", "./x")),
        ("../x", None, AdapterLocation("local", "../x")),
        ("org/name", "local", AdapterLocation("local", "org/name")),
        ("org/name@main", "hub", AdapterLocation("hub", "org/name", "main")),
        ("s3://bucket/p", "s3", AdapterLocation("s3", "s3://bucket/p")),
        ("org/name", "", AdapterLocation("hub", "org/name")),
    ],
)
def test_parse_adapter_id(adapter_id, source, expected):
    assert parse_adapter_id(adapter_id, source) == expected


@pytest.mark.parametrize(
    "adapter_id,source,param",
    [
        ("org/name", "pbase", "adapter_source"),
        ("org/name", "HUB", "adapter_source"),
        ("", None, "adapter_id"),
        ("org/name@", None, "adapter_id"),
        ("a/b/c", None, "adapter_id"),
        ("org/na me", None, "adapter_id"),
        ("org/name", "s3", "adapter_id"),
        ("s3://bucket/../other", None, "adapter_id"),
        ("s3:///prefix", None, "adapter_id"),
    ],
)
def test_parse_adapter_id_rejects(adapter_id, source, param):
    with pytest.raises(InvalidRequestError) as info:
        parse_adapter_id(adapter_id, source)
    assert info.value.param == param


# --- hub, offline from a prefilled cache ----------------------------------------------------------


@pytest.fixture
def offline_cache(tmp_path, tiny_adapters, monkeypatch):
    """A hub cache with org/adapter: main -> adapter a, tag v2 -> adapter b."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    main = add_commit(cache, "org/adapter", folder_files(tiny_adapters["a"]), refs=["main"])
    v2 = add_commit(cache, "org/adapter", folder_files(tiny_adapters["b"]), refs=["v2"])
    return cache, main, v2


def offline_sources(cache: Path, tmp_path: Path, known_public: tuple[str, ...] = ("org/adapter",)) -> AdapterSources:
    """Offline sources that learned earlier (online, persisted with the downloads) which repos are public."""
    sources = AdapterSources([], tmp_path / "downloads", hf_cache_dir=cache)
    for repo in known_public:
        sources.access_record.set(repo, "public")
    return sources


@pytest.mark.parametrize("revision,expected", [(None, "a"), ("main", "a"), ("v2", "b"), ("commit-of-b", "b")])
def test_hub_revisions_from_the_offline_cache(revision, expected, offline_cache, tiny_adapters, tmp_path):
    cache, _, v2 = offline_cache
    revision = v2 if revision == "commit-of-b" else revision
    sources = offline_sources(cache, tmp_path)
    location = parse_adapter_id("org/adapter" + (f"@{revision}" if revision else ""))

    sources.check_access(location, None)
    folder = sources.fetch(location)

    assert folder_files(folder) == folder_files(tiny_adapters[expected])
    assert folder.parent.name == "snapshots" and folder.is_relative_to(cache)


@pytest.mark.parametrize("adapter_id", ["org/unknown", "org/adapter@v9", "org/adapter@" + "0" * 40])
def test_hub_offline_unknown_repo_or_revision_is_not_found(adapter_id, offline_cache, tmp_path):
    sources = offline_sources(offline_cache[0], tmp_path)
    with pytest.raises(AdapterNotFoundError, match="not in the local hub cache .*HF_HUB_OFFLINE") as info:
        sources.fetch(parse_adapter_id(adapter_id))
    assert info.value.status == 404


@pytest.mark.parametrize("token,error", [(None, AdapterAuthError), ("hf_anything", AdapterForbiddenError)])
def test_hub_offline_fails_closed_when_access_was_never_checked(token, error, offline_cache, tmp_path):
    """A cached repo the hub never classified (prefilled cache, or a restart that lost the state) is refused."""
    sources = offline_sources(offline_cache[0], tmp_path, known_public=())
    location = parse_adapter_id("org/adapter")
    for attempt in (lambda: sources.check_access(location, token), lambda: sources.fetch(location, token)):
        with pytest.raises(error, match="access state is unknown"):
            attempt()


# --- hub, online: public, private and gated repos -------------------------------------------------

RIGHT, VALID_WITHOUT_ACCESS, UNKNOWN = "hf_right", "hf_other_user", "hf_bogus"


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {name: data for name, data in folder_files(folder).items() if name.startswith("adapter_")}


@pytest.fixture
def hub(tiny_adapters, monkeypatch):
    files = adapter_files(tiny_adapters["a"]) | {"README.md": b"# card", "training_args.bin": b"not served"}
    repos = {
        "org/public": HubRepo(files),
        "org/private": HubRepo(files, access_tokens=frozenset({RIGHT})),
        "org/gated": HubRepo(files, access_tokens=frozenset({RIGHT}), gated=True),
    }
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LORAX_USE_GLOBAL_HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with TinyHub(repos, known_tokens={RIGHT, VALID_WITHOUT_ACCESS}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def sources(hub, tmp_path) -> AdapterSources:
    return AdapterSources([], tmp_path / "downloads", hf_cache_dir=tmp_path / "hf-cache", hub_offline=False)


def test_public_adapter_needs_no_token_and_gets_only_adapter_files(hub, sources, tiny_adapters):
    folder = sources.fetch(parse_adapter_id("org/public"))

    assert folder_files(folder) == adapter_files(tiny_adapters["a"])  # no README.md, training_args.bin
    assert hub.requests and all(token is None for _, _, token in hub.requests)


def test_public_adapter_is_fetched_anonymously_even_when_the_client_sends_a_placeholder_token(hub, sources):
    """The OpenAI SDK always sends `Authorization: Bearer <api_key>` (e.g. "EMPTY")."""
    folder = sources.fetch(parse_adapter_id("org/public"), api_token="EMPTY")

    assert (folder / "adapter_config.json").exists()
    assert all(token is None for _, _, token in hub.requests)


def test_public_adapter_is_checked_with_the_hub_once(hub, sources):
    location = parse_adapter_id("org/public")
    sources.check_access(location, None)
    seen = len(hub.requests)

    sources.check_access(location, None)
    sources.check_access(location, UNKNOWN)

    assert len(hub.requests) == seen


@pytest.mark.parametrize(
    "repo,token,error,status",
    [
        ("org/private", None, AdapterAuthError, 401),
        ("org/private", UNKNOWN, AdapterForbiddenError, 403),
        ("org/gated", None, AdapterAuthError, 401),
        ("org/gated", UNKNOWN, AdapterForbiddenError, 403),
        ("org/gated", VALID_WITHOUT_ACCESS, AdapterForbiddenError, 403),
    ],
)
def test_private_and_gated_adapters_refuse_missing_or_wrong_tokens(repo, token, error, status, sources):
    location = parse_adapter_id(repo)
    for attempt in (lambda: sources.check_access(location, token), lambda: sources.fetch(location, token)):
        with pytest.raises(error) as info:
            attempt()
        assert type(info.value) is error and info.value.status == status and repo in info.value.message


def test_valid_token_without_access_to_a_private_repo_sees_not_found(sources):
    # The hub hides private repos from users who cannot read them: a 404, like an unknown repo.
    with pytest.raises(AdapterNotFoundError, match="or the token cannot read it"):
        sources.fetch(parse_adapter_id("org/private"), VALID_WITHOUT_ACCESS)


@pytest.mark.parametrize("repo", ["org/private", "org/gated"])
def test_right_token_fetches_and_only_it_unlocks_the_cached_adapter(repo, hub, sources, tiny_adapters):
    location = parse_adapter_id(repo)
    folder = sources.fetch(location, RIGHT)
    assert folder_files(folder) == adapter_files(tiny_adapters["a"])

    # Cached on disk and known now, yet every later request still has to show a valid token.
    with pytest.raises(AdapterAuthError):
        sources.check_access(location, None)
    with pytest.raises(AdapterAuthError):
        sources.fetch(location, None)  # snapshot_download alone would hand out the cached copy
    with pytest.raises(AdapterForbiddenError):
        sources.check_access(location, UNKNOWN)

    seen = len(hub.requests)
    sources.check_access(location, RIGHT)  # verified once, remembered by digest
    assert len(hub.requests) == seen


def test_global_hf_token_is_ignored_unless_enabled(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", RIGHT)
    location = parse_adapter_id("org/private")

    default = AdapterSources([], tmp_path / "d1", hf_cache_dir=tmp_path / "c1", hub_offline=False)
    with pytest.raises(AdapterAuthError):
        default.fetch(location)
    assert all(token is None for _, _, token in hub.requests)

    monkeypatch.setenv("LORAX_USE_GLOBAL_HF_TOKEN", "1")
    enabled = AdapterSources([], tmp_path / "d2", hf_cache_dir=tmp_path / "c2", hub_offline=False)
    assert (enabled.fetch(location) / "adapter_config.json").is_file()
    enabled.check_access(location, None)


@pytest.mark.parametrize(
    "adapter_id,match", [("org/missing", "not found on the hub"), ("org/public@v9", "no revision 'v9'")]
)
def test_hub_unknown_repo_or_revision_is_not_found(adapter_id, match, sources):
    with pytest.raises(AdapterNotFoundError, match=match):
        sources.fetch(parse_adapter_id(adapter_id))


def test_unreachable_hub_and_uncached_adapter_is_not_found(tmp_path):
    """As vLLM: an id this server cannot find is a 404 naming where it looked, not a 503."""
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    sources = AdapterSources([], tmp_path, hf_cache_dir=tmp_path / "hf", hub_endpoint=f"http://127.0.0.1:{closed_port}",
                             hub_offline=False)
    with pytest.raises(AdapterNotFoundError, match="not in the local hub cache .* the hub cannot be reached") as info:
        sources.check_access(parse_adapter_id("org/public"), None)
    assert info.value.status == 404 and info.value.code == "model_not_found"


def test_offline_hub_still_enforces_what_it_learned_online(sources, tiny_adapters):
    location = parse_adapter_id("org/private")
    sources.fetch(location, RIGHT)
    sources.hub_offline = True

    sources.check_access(location, RIGHT)
    with pytest.raises(AdapterAuthError):
        sources.check_access(location, None)


def test_what_the_hub_said_survives_a_restart_offline(hub, sources, tmp_path):
    """The issue's case: a private adapter in the disk cache, the server restarted with HF_HUB_OFFLINE=1."""
    private, public = parse_adapter_id("org/private"), parse_adapter_id("org/public")
    sources.fetch(private, RIGHT)
    sources.fetch(public)

    restarted = AdapterSources([], tmp_path / "downloads", hf_cache_dir=tmp_path / "hf-cache", hub_offline=True)
    seen = len(hub.requests)
    restarted.check_access(public, None)
    for token, error in ((None, AdapterAuthError), (RIGHT, AdapterForbiddenError)):
        with pytest.raises(error, match="private and the hub is offline"):
            restarted.fetch(private, token)  # a token verified before the restart is not trusted blindly
    assert len(hub.requests) == seen  # offline: the hub is never asked


def test_verified_tokens_expire(hub, tmp_path):
    sources = AdapterSources([], tmp_path / "d", hf_cache_dir=tmp_path / "c", hub_offline=False,
                             verified_token_ttl_s=0.0)
    location = parse_adapter_id("org/private")
    sources.fetch(location, RIGHT)
    seen = len(hub.requests)
    sources.check_access(location, RIGHT)
    assert len(hub.requests) > seen  # checked with the hub again: the earlier verification expired
    sources.hub_offline = True
    with pytest.raises(AdapterForbiddenError):
        sources.check_access(location, RIGHT)


# --- S3 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tiny_adapters):
    """Bucket `adapters` with adapter a under team/a/ and an unrelated team/ab/ next to it."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    bucket = f"adapters-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    for name, data in folder_files(tiny_adapters["a"]).items():
        client.put_object(Bucket=bucket, Key=f"team/a/{name}", Body=data)
    client.put_object(Bucket=bucket, Key="team/ab/adapter_config.json", Body=b"{}")
    return client, bucket


def s3_sources(tmp_path: Path, bucket: str, **kwargs) -> AdapterSources:
    return AdapterSources([], tmp_path, s3_allow=[f"s3://{bucket}/team"], **kwargs)


def test_s3_prefix_is_mirrored_into_the_download_dir(s3, tmp_path, tiny_adapters):
    _, bucket = s3
    sources = s3_sources(tmp_path, bucket)

    folder = sources.fetch(parse_adapter_id(f"s3://{bucket}/team/a"))

    assert folder == (tmp_path / "s3" / bucket / "team" / "a").resolve()
    assert {k: v for k, v in folder_files(folder).items() if not k.startswith(".")} == folder_files(tiny_adapters["a"])
    assert not (tmp_path / "s3" / bucket / "team" / "ab").exists()


def test_s3_refetch_downloads_only_changed_objects_and_drops_deleted_ones(s3, tmp_path):
    client, bucket = s3
    sources = s3_sources(tmp_path, bucket)
    location = parse_adapter_id(f"s3://{bucket}/team/a")
    folder = sources.fetch(location)

    config_path = folder / "adapter_config.json"
    local_edit = bytes(reversed(config_path.read_bytes()))  # same size, so only the ETag tells
    config_path.write_bytes(local_edit)
    sources.fetch(location)
    assert config_path.read_bytes() == local_edit  # unchanged object: not downloaded again

    client.put_object(Bucket=bucket, Key="team/a/adapter_config.json", Body=b'{"peft_type": "LORA"}')
    client.delete_object(Bucket=bucket, Key="team/a/README.md")
    sources.fetch(location)
    assert config_path.read_bytes() == b'{"peft_type": "LORA"}'
    assert not (folder / "README.md").exists()


@pytest.mark.parametrize(
    "uri", ["s3://{bucket}/team/missing", "s3://{bucket}/team/a/adapter", "s3://no-such-bucket-here/team/a"]
)
def test_s3_missing_prefix_or_bucket_is_not_found(uri, s3, tmp_path):
    _, bucket = s3
    sources = AdapterSources([], tmp_path, s3_allow=[f"s3://{bucket}/team", "s3://no-such-bucket-here"])
    with pytest.raises(AdapterNotFoundError) as info:
        sources.fetch(parse_adapter_id(uri.format(bucket=bucket)))
    assert info.value.status == 404


@pytest.mark.parametrize("allow", [(), ("s3://{bucket}/team/b",), ("s3://{bucket}/tea",), ("s3://other/team",)])
def test_s3_only_allowlisted_prefixes_are_fetched(allow, s3, tmp_path):
    _, bucket = s3
    sources = AdapterSources([], tmp_path, s3_allow=[entry.format(bucket=bucket) for entry in allow])
    with pytest.raises(AdapterForbiddenError, match="not under an allowed S3 prefix") as info:
        sources.fetch(parse_adapter_id(f"s3://{bucket}/team/a"))
    assert info.value.status == 403
    assert not (tmp_path / "s3").exists()


@pytest.mark.parametrize("uri", ["s3://{bucket}", "s3://{bucket}/", "s3://{bucket}/./"])
def test_s3_whole_bucket_is_refused(uri, s3, tmp_path):
    _, bucket = s3
    with pytest.raises(InvalidRequestError, match="whole bucket"):
        parse_adapter_id(uri.format(bucket=bucket))


def test_s3_download_is_capped_per_adapter(s3, tmp_path):
    _, bucket = s3
    sources = s3_sources(tmp_path, bucket, max_adapter_bytes=1000)
    with pytest.raises(AdapterValidationError, match="above the per-adapter download limit") as info:
        sources.fetch(parse_adapter_id(f"s3://{bucket}/team/a"))
    assert info.value.status == 400
    assert not (tmp_path / "s3").exists()


def test_s3_spellings_share_one_location(s3):
    _, bucket = s3
    spellings = [f"s3://{bucket}/team/a", f"s3://{bucket}/team/a/", f"s3://{bucket}/./team//a"]
    assert {parse_adapter_id(uri) for uri in spellings} == {AdapterLocation("s3", f"s3://{bucket}/team/a")}


# --- local folders --------------------------------------------------------------------------------


@pytest.fixture
def local_tree(tmp_path):
    """root/escape is a symlink to outside/secret, an adapter folder outside the root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "adapter_config.json").write_text("{}")
    root.mkdir()
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    return root, outside


def test_local_adapter_inside_a_root(tiny_adapters, adapter_root, tmp_path):
    sources = AdapterSources([tmp_path, adapter_root], tmp_path / "downloads")

    assert sources.fetch(parse_adapter_id(str(tiny_adapters["b"]))) == tiny_adapters["b"].resolve()
    assert sources.fetch(parse_adapter_id("c", "local")) == tiny_adapters["c"].resolve()
    assert sources.fetch(parse_adapter_id(str(adapter_root / "x" / ".." / "a"))) == tiny_adapters["a"].resolve()


@pytest.mark.parametrize(
    "path",
    [
        "{root}/../outside/secret",  # .. traversal
        "{outside}/secret",  # absolute path outside
        "{outside}/not-there",  # outside and missing: same answer, no existence oracle
        "{root}/escape",  # symlink inside the root pointing outside
        "../outside/secret",  # relative to the root
        "/etc",
    ],
)
def test_local_paths_outside_the_roots_are_refused(path, local_tree, tmp_path):
    root, outside = local_tree
    sources = AdapterSources([root], tmp_path / "downloads")
    location = parse_adapter_id(path.format(root=root, outside=outside), "local")
    with pytest.raises(InvalidRequestError, match="outside the configured adapter roots") as info:
        sources.fetch(location)
    assert info.value.status == 400


def test_symlinked_root_is_resolved_before_comparing(tmp_path, tiny_adapters, adapter_root):
    (tmp_path / "link-to-root").symlink_to(adapter_root, target_is_directory=True)
    sources = AdapterSources([tmp_path / "link-to-root"], tmp_path / "downloads")
    assert sources.fetch(parse_adapter_id(str(adapter_root / "a"))) == tiny_adapters["a"].resolve()


def test_missing_local_folder_is_not_found(local_tree, tmp_path):
    root, _ = local_tree
    sources = AdapterSources([root], tmp_path / "downloads")
    for path in (str(root / "nope"), "nope"):
        with pytest.raises(AdapterNotFoundError) as info:
            sources.fetch(parse_adapter_id(path, "local"))
        assert info.value.status == 404


def test_local_and_s3_need_no_hub_token(local_tree, tmp_path):
    sources = AdapterSources([local_tree[0]], tmp_path)
    sources.check_access(AdapterLocation("local", str(local_tree[0] / "nope")), None)
    sources.check_access(AdapterLocation("s3", "s3://bucket/x"), None)
