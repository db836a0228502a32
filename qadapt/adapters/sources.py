"""Turn an adapter source (local folder, Hugging Face Hub id, ``s3://`` URL) into a local folder.

The one place qadapt fetches adapters (house rule 11): the CLI, the server's
``load_lora_adapter`` and orderings' ``preload_adapters`` all call
:func:`resolve_adapter`, so caching, credentials and error messages behave the
same everywhere. Only fetching happens here; whether the folder holds a valid
PEFT or X-LoRA adapter is checked by the format readers.

S3 cache layout: ``<cache root>/s3/<bucket>/<prefix>/`` mirrors the objects under
the prefix, plus :data:`MANIFEST` (key, ETag and size of each object, and whether
the folder is complete). Each object is written atomically and the manifest is
marked complete last, so a folder is only trusted after a whole download.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..cache import cache_root, file_lock
from ..errors import InputError, SourceError
from ..io import atomic_open, read_json, write_json

logger = logging.getLogger(__name__)

SOURCES = ("local", "hub", "s3")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
#: X-LoRA reference / mistral.rs layout: classifier at the top, adapters in sub-folders
XLORA_FILES = ("xlora_config.json", "xlora_classifier.safetensors", "xlora_classifier.bin")
#: completion marker of a cached S3 folder (never taken from the bucket)
MANIFEST = ".qadapt-s3-manifest.json"
_CHUNK = 1 << 20  # bytes per read of an S3 object body
_PAGE_SIZE = 1000  # keys per listing page (S3's maximum)
_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- entry points


def resolve_adapter(
    source: str,
    adapter_source: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    subfolder: str | None = None,
    token: str | None = None,
) -> Path:
    """A local folder holding the adapter files named by ``source``.

    ``adapter_source`` is ``local``, ``hub`` or ``s3``; when None it is inferred
    (``s3://`` URL, else an existing path, else a Hub ``org/name`` id), so that an
    ``s3://`` id is never mistaken for a Hub id. ``revision`` applies to the Hub
    only; ``cache_dir`` replaces the Hub cache (Hub) or the qadapt cache root (S3);
    ``subfolder`` selects one adapter inside the source (mistral.rs layout).
    """
    kind = adapter_source or infer_source(source)
    if kind not in SOURCES:
        raise InputError(f"adapter source type `{kind}` for `{source}`: expected one of {', '.join(SOURCES)}")
    if revision is not None and kind != "hub":
        raise InputError(f"adapter `{source}`: a revision applies to Hub adapters only, not to a {kind} source")
    if kind == "local":
        return _resolve_local(source, subfolder)
    if kind == "hub":
        return _resolve_hub(source, revision=revision, cache_dir=cache_dir, subfolder=subfolder, token=token)
    return _resolve_s3(source, cache_dir=cache_dir, subfolder=subfolder)


def infer_source(source: str) -> str:
    """``s3``, ``local`` or ``hub`` for ``source``; a string that is none of them is an InputError."""
    if source[:5].lower() == "s3://":
        return "s3"
    if Path(source).expanduser().exists():
        return "local"
    if is_hub_id(source):
        return "hub"
    raise InputError(
        f"adapter source `{source}`: the path does not exist and it is not a Hub id (org/name) or an s3:// URL"
    )


def is_hub_id(source: str) -> bool:
    """True for a well-formed ``org/name`` Hub id (bare names are refused: they read like typos of paths)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.count("/") != 1:
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def split_source(spec: str) -> tuple[str, str]:
    """``NAME=SOURCE`` (a CLI adapter spec) -> ``(name, source)``; the source may itself contain ``=``."""
    name, sep, source = spec.partition("=")
    name, source = name.strip(), source.strip()
    if not sep:
        raise InputError(f"adapter spec `{spec}`: expected NAME=SOURCE, e.g. math=org/math-lora")
    if not name or not source:
        missing = "name" if not name else "source"
        raise InputError(f"adapter spec `{spec}`: the {missing} is empty; expected NAME=SOURCE")
    return name, source


def adapter_subfolder(root: str | os.PathLike, name: str) -> Path:
    """``root/name``, refusing names that would leave ``root`` (``..``, absolute, symlinks pointing out).

    mistral.rs keeps each adapter of an ordering in a sub-folder of
    ``adapter_model_id``; the names come from files users download, so they are
    not trusted to stay inside the folder.
    """
    root = Path(root)
    try:
        parts = _relative_parts(name.rstrip("/"))
    except ValueError as e:
        raise InputError(f"adapter sub-folder `{name}` of {root}: {e}") from None
    path = root.joinpath(*parts)
    if not _inside(path, root):
        raise InputError(f"adapter sub-folder `{name}` of {root} resolves to {path.resolve()}, outside {root}")
    return path


# --------------------------------------------------------------------------- shared helpers


def _relative_parts(name: str) -> tuple[str, ...]:
    """The components of a relative, downward-only path; ValueError saying what is wrong otherwise."""
    if not name:
        raise ValueError("the name is empty")
    if "\0" in name or "\\" in name:
        raise ValueError("contains a NUL byte or a backslash")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ValueError("is an absolute path")
    parts = tuple(name.split("/"))
    if ".." in parts:
        raise ValueError("contains a `..` component")
    if any(p in ("", ".") for p in parts):
        raise ValueError("has an empty or `.` component")
    return parts


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` stays under ``root`` once symlinks are followed."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- local


def _resolve_local(source: str, subfolder: str | None) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"adapter folder {path} does not exist")
    if subfolder:
        path = adapter_subfolder(path, subfolder)
        if not path.exists():
            raise InputError(f"adapter folder {path} does not exist")
    if not path.is_dir():
        raise InputError(
            f"adapter source {path} is a file; expected a folder holding adapter_config.json and "
            "adapter_model.safetensors"
        )
    return path.resolve()


# --------------------------------------------------------------------------- Hugging Face Hub


def hub_allow_patterns(subfolder: str | None = None) -> list[str]:
    """The files fetched from a Hub repo: adapter and X-LoRA files, and adapters in sub-folders."""
    base = f"{subfolder.strip('/')}/" if subfolder else ""
    return [base + n for n in ADAPTER_FILES + XLORA_FILES] + [f"{base}*/{n}" for n in ADAPTER_FILES]


def _resolve_hub(
    repo_id: str, *, revision: str | None, cache_dir: str | os.PathLike | None, subfolder: str | None,
    token: str | None = None,
) -> Path:
    from ..hub import download

    if not is_hub_id(repo_id):
        raise InputError(f"`{repo_id}` is not a Hub id (expected org/name)")
    if subfolder:
        try:
            _relative_parts(subfolder.strip("/"))  # checked before any download
        except ValueError as e:
            raise InputError(f"`{repo_id}`: sub-folder `{subfolder}` {e}") from None
    folder = download(repo_id, allow_patterns=hub_allow_patterns(subfolder), revision=revision, cache=cache_dir,
                      what=f"Hub adapter `{repo_id}`", token=token)
    if subfolder:
        folder = adapter_subfolder(folder, subfolder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise SourceError(
            f"Hub adapter `{repo_id}` has no adapter files{f' under `{subfolder}`' if subfolder else ''} "
            f"(looked for {', '.join(ADAPTER_FILES + XLORA_FILES)})"
        )
    return folder


# --------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Location:
    """A parsed ``s3://bucket/prefix`` (prefix without surrounding slashes, may be empty)."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key_prefix(self) -> str:
        """What the listing asks for: ``prefix/``, so that ``a1`` does not also match ``a10/...``."""
        return f"{self.prefix}/" if self.prefix else ""


def parse_s3_url(url: str, subfolder: str | None = None) -> S3Location:
    """Split and check an ``s3://`` URL; the prefix becomes cache folders, so it must stay relative."""
    if url[:5].lower() != "s3://":
        raise InputError(f"`{url}` is not an s3:// URL")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket or bucket in (".", ".."):
        raise InputError(f"`{url}`: no bucket name (expected s3://bucket/prefix)")
    prefix = "/".join(p for p in (prefix.strip("/"), (subfolder or "").strip("/")) if p)
    if prefix:
        try:
            _relative_parts(prefix)
        except ValueError as e:
            raise InputError(f"`{url}`: the prefix `{prefix}` {e}") from None
    return S3Location(bucket, prefix)


@dataclass(frozen=True)
class _Object:
    key: str
    etag: str
    size: int


class EndpointUnreachableError(SourceError):
    """The S3 endpoint did not answer: the only failure where a complete cached copy may be used."""


_S3_REASONS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied (check the permissions of these credentials on the bucket)",
    "AllAccessDisabled": "access denied (all access to this object has been disabled)",
    "InvalidAccessKeyId": "the access key id is not known to the endpoint (check AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "the secret key does not match the access key (check AWS_SECRET_ACCESS_KEY)",
    "InvalidToken": "the session token is invalid (check AWS_SESSION_TOKEN)",
    "ExpiredToken": "the session token has expired (refresh AWS_SESSION_TOKEN)",
    "PermanentRedirect": "the bucket is in another region (set AWS_REGION)",
    "AuthorizationHeaderMalformed": "the bucket is in another region (set AWS_REGION)",
    "NoSuchKey": "an object disappeared while it was being downloaded",
}


@contextmanager
def _s3_errors(url: str, endpoint: str, key: str | None = None) -> Iterator[None]:
    """Turn botocore and file-system failures into a SourceError naming the URL (and key)."""
    from botocore import exceptions as bx

    what = f"cannot fetch {url}" + (f" (object `{key}`)" if key else "") + f" from {endpoint}"
    try:
        yield
    except bx.NoCredentialsError:
        raise SourceError(
            f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        ) from None
    except (bx.ConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError) as e:
        raise EndpointUnreachableError(
            f"{what}: the endpoint is unreachable ({e}); check AWS_ENDPOINT_URL / S3_ENDPOINT_URL and the network"
        ) from None
    except bx.ClientError as e:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        reason = _S3_REASONS.get(code) or (
            _S3_REASONS["AccessDenied"] if status == 403 else f"{code or status}: {err.get('Message', e)}"
        )
        raise SourceError(f"{what}: {reason}") from None
    except bx.BotoCoreError as e:
        raise SourceError(f"{what}: {e}") from None
    except OSError as e:
        raise SourceError(f"{what}: cannot write the cache: {e}") from None


def _s3_client() -> Any:
    """An S3 client from the standard AWS variables, read afresh on each call.

    boto3 reads ``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_S3``) itself; LoRAX's
    ``S3_ENDPOINT_URL`` is passed on only when neither is set, so that users of an
    S3-compatible store need no extra variable.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise SourceError("s3:// adapter sources need boto3, which the `s3` extra installs: "
                          "pip install 'qadapt[s3]'") from None

    endpoint = None
    if not (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")):
        endpoint = os.environ.get("S3_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    session = boto3.session.Session()  # a fresh session: no credentials cached from an earlier call
    return session.client(
        "s3", endpoint_url=endpoint, region_name=region, config=Config(connect_timeout=10, read_timeout=60)
    )


def _list_objects(client: Any, loc: S3Location) -> list[_Object]:
    """Every object under the prefix (all pages), leaving out zero-byte 'folder' markers."""
    objects = []
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=loc.bucket, Prefix=loc.key_prefix(), PaginationConfig={"PageSize": _PAGE_SIZE}
    )
    for page in pages:
        for obj in page.get("Contents", ()):
            if obj["Key"].endswith("/"):
                continue
            objects.append(_Object(obj["Key"], obj.get("ETag", ""), int(obj.get("Size", 0))))
    return objects


def _local_name(loc: S3Location, folder: Path, key: str) -> str:
    """The path of ``key`` inside the cache folder, refusing keys that could land outside it."""
    rel = key[len(loc.key_prefix()):]
    try:
        parts = _relative_parts(rel)
    except ValueError as e:
        raise SourceError(f"{loc.url}: refusing object `{key}`: its name {e}") from None
    if MANIFEST in parts:
        raise SourceError(f"{loc.url}: refusing object `{key}`: the name is reserved for qadapt's cache manifest")
    if not _inside(folder.joinpath(*parts), folder):
        raise SourceError(f"{loc.url}: refusing object `{key}`: it would be written outside {folder}")
    return rel


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a cached folder, or an empty one when missing or unreadable (then nothing is trusted)."""
    path = folder / MANIFEST
    if path.is_file():
        try:
            data = read_json(path, "S3 cache manifest")
            if isinstance(data, dict) and isinstance(data.get("objects"), dict):
                return data
        except InputError as e:
            logger.warning("ignoring a damaged S3 cache manifest: %s", e)
    return {"complete": False, "objects": {}}


def _is_current(folder: Path, rel: str, obj: _Object, manifest: dict[str, Any]) -> bool:
    """Whether the cached file for ``rel`` is this version of the object (same ETag, full size on disk)."""
    entry = manifest["objects"].get(rel)
    path = folder / rel
    return (
        isinstance(entry, dict)
        and entry.get("etag") == obj.etag
        and entry.get("size") == obj.size
        and path.is_file()
        and path.stat().st_size == obj.size
    )


def _cache_is_complete(folder: Path, manifest: dict[str, Any]) -> bool:
    """Whether a cached folder may be used without asking S3 (only when the endpoint is unreachable)."""
    entries = manifest["objects"].values()
    return bool(manifest.get("complete")) and all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and (folder / e["path"]).is_file() for e in entries
    )


def _make_progress(total: int, desc: str) -> Any:
    """A tqdm bar over bytes (hidden when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


def _download(client: Any, loc: S3Location, key: str, dest: Path, progress: Any) -> _Object:
    """Stream one object into ``dest`` through a temp file; a short or failed read leaves nothing behind."""
    resp = client.get_object(Bucket=loc.bucket, Key=key)
    expected = int(resp["ContentLength"])
    done = 0
    with closing(resp["Body"]) as body, atomic_open(dest, "wb", force=True) as f:
        for chunk in body.iter_chunks(_CHUNK):
            f.write(chunk)
            done += len(chunk)
            progress.update(len(chunk))
        if done != expected:
            raise SourceError(f"cannot fetch {loc.url}: object `{key}` ended after {done} of {expected} bytes")
    return _Object(key, resp.get("ETag", ""), done)


def _resolve_s3(url: str, *, cache_dir: str | os.PathLike | None, subfolder: str | None) -> Path:
    loc = parse_s3_url(url, subfolder)
    root = cache_root(cache_dir)
    folder = root.joinpath("s3", loc.bucket, *loc.prefix.split("/")) if loc.prefix else root / "s3" / loc.bucket
    with file_lock(root, loc.url):
        manifest = _read_manifest(folder)
        client = _s3_client()
        endpoint = client.meta.endpoint_url
        try:
            with _s3_errors(loc.url, endpoint):
                listing = _list_objects(client, loc)
        except EndpointUnreachableError as e:
            if _cache_is_complete(folder, manifest):
                logger.warning("%s; using the cached copy in %s", e, folder)
                return folder
            raise
        if not listing:
            where = f"under the prefix `{loc.key_prefix()}`" if loc.prefix else "in the bucket"
            raise SourceError(f"cannot fetch {loc.url} from {endpoint}: no objects {where}")
        _sync(client, loc, endpoint, folder, listing, manifest)
    return folder


def _sync(
    client: Any, loc: S3Location, endpoint: str, folder: Path, listing: list[_Object], manifest: dict[str, Any]
) -> None:
    """Bring ``folder`` to the listed versions: download new or changed objects, drop removed ones."""
    wanted = {_local_name(loc, folder, o.key): o for o in listing}
    todo = {rel: o for rel, o in wanted.items() if not _is_current(folder, rel, o, manifest)}
    stale = [rel for rel in manifest["objects"] if rel not in wanted]
    if not todo and not stale and manifest.get("complete"):
        logger.info("%s: using the cached copy in %s", loc.url, folder)
        return
    state: dict[str, Any] = {
        "url": loc.url,
        "complete": False,
        "objects": {rel: manifest["objects"][rel] for rel in wanted if rel not in todo},
    }
    manifest_path = folder / MANIFEST
    with _s3_errors(loc.url, endpoint):
        write_json(manifest_path, state, force=True)  # not trusted until rewritten complete, last
        for rel in stale:
            stale_path = folder / rel
            if _inside(stale_path, folder) and stale_path.is_file():
                logger.info("%s: removing %s (no longer in the bucket)", loc.url, rel)
                stale_path.unlink()
    total = sum(o.size for o in todo.values())
    logger.info("%s: downloading %d object(s), %d bytes, into %s", loc.url, len(todo), total, folder)
    with _make_progress(total, loc.url) as progress:
        for rel, obj in sorted(todo.items()):
            with _s3_errors(loc.url, endpoint, obj.key):
                got = _download(client, loc, obj.key, folder / rel, progress)
                state["objects"][rel] = {"key": obj.key, "path": rel, "etag": got.etag, "size": got.size}
                write_json(manifest_path, state, force=True)
            logger.debug("%s: fetched %s (%d bytes)", loc.url, obj.key, got.size)
    state["complete"] = True
    with _s3_errors(loc.url, endpoint):
        write_json(manifest_path, state, force=True)
