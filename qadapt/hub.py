"""The one place qadapt talks to the Hugging Face Hub: models, GGUF files, configs and adapters.

huggingface_hub reads ``HF_HUB_OFFLINE`` and the cache variables once, at import;
this helper reads them at call time (so a script or test that sets them later is
honoured) and turns the Hub's errors into :class:`SourceError` messages that say
what to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import InputError, SourceError

log = logging.getLogger(__name__)
_TRUE = ("1", "true", "yes", "on")


def offline_var() -> str | None:
    """The variable that put the Hub in offline mode, if any."""
    return next((v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(v, "").strip().lower() in _TRUE), None)


def cache_dir() -> str | None:
    """The Hub cache from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def download(repo_id: str, *, filename: str | None = None, allow_patterns: list[str] | None = None,
             revision: str | None = None, cache: str | os.PathLike | None = None, what: str | None = None,
             offline: bool | None = None, token: str | None = None) -> Path:
    """One file (``filename``) or a filtered snapshot (``allow_patterns``) of a Hub repo, through the cache.

    Returns the file's or the snapshot folder's local path. ``token``: a Hub token for this download
    (LoRAX's per-request ``api_token``); None: HF_TOKEN or the stored login.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub import errors as hf

    var = offline_var()
    local_only = bool(var) if offline is None else offline
    cache = str(cache) if cache is not None else cache_dir()
    what = what or f"Hub repo `{repo_id}`" + (f" file `{filename}`" if filename else "")
    if revision:
        what += f" (revision `{revision}`)"
    where = cache or "the default Hugging Face cache"
    log.info("fetching %s%s", what, " from the local cache only" if local_only else "")
    try:
        if filename is not None:
            path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache,
                                   local_files_only=local_only, token=token)
        else:
            path = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=allow_patterns,
                                     local_files_only=local_only, token=token)
    except hf.GatedRepoError:  # a RepositoryNotFoundError subclass: test it first
        raise SourceError(f"{what} is gated: accept its terms on https://huggingface.co/{repo_id} and set HF_TOKEN") from None
    except hf.RepositoryNotFoundError:
        raise SourceError(f"{what} was not found on the Hub (a private repo needs HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise SourceError(f"{what}: the revision does not exist on the Hub") from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled):
        if local_only:
            how = f"offline mode is on ({var}=1 is set)" if var else "offline mode was asked for"
            raise SourceError(f"{what} is not in the local Hugging Face cache ({where}) and {how}: unset it to "
                              "download, or download it first on a connected machine") from None
        raise SourceError(f"{what} is not in the local Hugging Face cache ({where}) and the Hub cannot be reached (no network, or offline): "
                          "check the network, HF_ENDPOINT or proxy settings") from None
    except hf.EntryNotFoundError:  # after LocalEntryNotFoundError, its subclass
        raise SourceError(f"{what} does not exist in the repo") from None
    except hf.HfHubHTTPError as e:
        raise SourceError(f"{what} could not be fetched from the Hub: {e}") from None
    except hf.HFValidationError as e:
        raise InputError(f"{what}: {e}") from None
    except OSError as e:
        raise SourceError(f"{what}: cannot write the Hub cache {where}: {e}") from None
    return Path(path)
