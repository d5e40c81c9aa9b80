"""Fetch a model repo from the Hugging Face Hub: only the files a checkpoint needs.

That is config.json, the safetensors weights (the shards its index names, or
`model.safetensors`), the tokenizer files and generation_config.json; `.bin` pickles only when a
repo has no safetensors. The files land in huggingface_hub's cache (`HF_HOME`, `HF_HUB_CACHE`),
so a rerun after an interrupted download fetches only the files still missing, and a complete
earlier download is used as it is when the Hub cannot be reached (or `HF_HUB_OFFLINE=1`).

Every failure a user can act on (not found, gated, no network, interrupted) becomes one
UserError line. Nothing here imports torch.
"""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Optional, TypeVar

from lifecycle_cli.errors import UserError
from lifecycle_cli.tokenizer import SENTENCEPIECE_FILE, TOKENIZER_FILES

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, SENTENCEPIECE_FILE)
TOKEN_HINT = "pass --access_token TOKEN or set HF_TOKEN"

T = TypeVar("T")


def fetch(
    repo_id: str,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    cache_dir: Optional[Path] = None,
) -> Path:
    """Download what a checkpoint needs of `repo_id`; the snapshot folder in the cache.

    `token` None means huggingface_hub's own lookup ($HF_TOKEN, then the token `hf auth login`
    saved); `endpoint` None means $HF_ENDPOINT, else huggingface.co; `cache_dir` None means
    huggingface_hub's cache under $HF_HOME.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    from lifecycle_cli.zoo.convert import config_from_hf

    if constants.HF_HUB_OFFLINE:  # no request at all, not even the one that would fail
        cached = cached_snapshot(repo_id, revision, cache_dir)
        if cached is None:
            at = f" at revision {revision!r}" if revision else ""
            raise UserError(
                f"HF_HUB_OFFLINE is set and the Hugging Face cache holds no complete download of "
                f"{repo_id}{at}; unset it to download, or convert a local folder with --from_dir"
            )
        print(f"HF_HUB_OFFLINE is set; using the earlier download in {cached}", file=sys.stderr)
        return cached
    hub = _Hub(repo_id, revision, endpoint)
    common = dict(repo_id=repo_id, revision=revision, token=token, endpoint=endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        # One request, not retried (listing the tree backs off for ~20 s when nothing answers).
        info = api.model_info(repo_id, revision=revision)
    except Exception as e:
        cached = cached_snapshot(repo_id, revision, cache_dir) if _hub_down(e) else None
        if cached is None:
            raise hub.error(e) from None
        print(f"The Hub is unreachable; using the earlier download in {cached}", file=sys.stderr)
        return cached
    hub.reached = True
    if info.siblings is not None:
        files = {sibling.rfilename for sibling in info.siblings}
    else:
        files = set(hub.call(api.list_repo_files, repo_id=repo_id, revision=revision))

    def get(filename: str) -> Path:
        return Path(hub.call(hf_hub_download, filename=filename, cache_dir=cache_dir, **common))

    if "config.json" not in files:
        raise UserError(f"{repo_id} has no config.json: it is not a transformers model repo")
    # An unsupported model_type stops here, before any weights are downloaded.
    config_from_hf(_read_json(get("config.json")), repo_id)
    wanted = [glob.escape(name) for name in needed_files(files, get, repo_id)]
    folder = hub.call(snapshot_download, allow_patterns=wanted, cache_dir=cache_dir, **common)
    return Path(folder)


DATA_FILES = ("*.parquet", "*.jsonl", "*.json", "*.txt", "*.csv", "*.tsv")
"""What `fetch_dataset` downloads of a data set repo by default: the files `--data.path` reads."""


def fetch_dataset(
    repo_id: str,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    files: Optional[list[str]] = None,
    endpoint: Optional[str] = None,
    cache_dir: Optional[Path] = None,
) -> Path:
    """Download the data files of the data set repo `repo_id` (those matching the globs
    `files`, default `DATA_FILES` anywhere in the repo) into huggingface_hub's cache; the
    snapshot folder. A rerun fetches only what is missing; offline, a complete earlier
    download is used."""
    from huggingface_hub import HfApi, constants, snapshot_download

    hub = _Hub(repo_id, revision, endpoint)
    patterns = list(files) if files else [f"**{p}" for p in DATA_FILES] + list(DATA_FILES)
    common = dict(repo_id=repo_id, revision=revision, repo_type="dataset", cache_dir=cache_dir)
    if constants.HF_HUB_OFFLINE:
        try:
            folder = snapshot_download(allow_patterns=patterns, local_files_only=True, **common)
        except Exception:
            raise UserError(
                f"HF_HUB_OFFLINE is set and the Hugging Face cache holds no download of the "
                f"data set {repo_id}; unset it to download"
            ) from None
        return Path(folder)
    api = HfApi(endpoint=endpoint, token=token)
    info = hub.call(api.dataset_info, repo_id=repo_id, revision=revision)
    hub.reached = True
    names = {s.rfilename for s in info.siblings or []}
    matching = [n for n in names if any(fnmatch(n, p) for p in patterns)]
    if names and not matching:
        wanted = ", ".join(files) if files else "parquet, JSON, JSONL, text, CSV or TSV"
        raise UserError(
            f"data set {repo_id} has no {wanted} files (its files: "
            f"{', '.join(sorted(names)[:8])}); name others with --files GLOB"
        )
    folder = hub.call(
        snapshot_download, allow_patterns=patterns, token=token, endpoint=endpoint, **common
    )
    return Path(folder)


def needed_files(files: set[str], get: Callable[[str], Path], repo_id: str) -> list[str]:
    """What to download of a repo holding `files`: side files, then weights. Safetensors when
    there are any, else `.bin` pickles; with an index, only the shards it names (Mistral repos
    also hold a consolidated copy of the weights). `get` fetches a file (an index) to read."""
    side = [name for name in SIDE_FILES if name in files]
    for index, single in (
        (SAFETENSORS_INDEX, "model.safetensors"),
        (BIN_INDEX, "pytorch_model.bin"),
    ):
        if index in files:
            weight_map = _read_json(get(index)).get("weight_map") or {}
            return [*side, index, *sorted(set(weight_map.values()))]
        if single in files:
            return [*side, single]
        if index == SAFETENSORS_INDEX:
            root = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
            if root:
                return [*side, *root]
    raise UserError(
        f"{repo_id} has no safetensors or pytorch_model.bin weights "
        f"(its files: {', '.join(sorted(files)[:8])})"
    )


def cached_snapshot(
    repo_id: str, revision: Optional[str] = None, cache_dir: Optional[Path] = None
) -> Optional[Path]:
    """The snapshot folder of a complete earlier download of `repo_id`, else None."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    try:
        from huggingface_hub import get_cached_repo_tree  # absent from older versions

        tree = get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)
        wanted = needed_files({f.path for f in tree}, lambda name: folder / name, repo_id)
    except Exception:  # no cached listing or an index missing: not known to be complete
        return None
    return folder if all((folder / name).is_file() for name in wanted) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} should hold a JSON object")
    return value


class _Hub:
    """Turns huggingface_hub's exceptions about one repo into one-line UserErrors."""

    def __init__(self, repo_id: str, revision: Optional[str], endpoint: Optional[str]) -> None:
        from huggingface_hub import constants

        self.repo_id, self.revision = repo_id, revision
        self.endpoint = endpoint or constants.ENDPOINT
        # Once the Hub has answered, a broken connection interrupts a download under way.
        self.reached = False

    def call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        try:
            return fn(**kwargs)
        except Exception as e:
            raise self.error(e) from None

    def error(self, e: Exception) -> Exception:
        """The UserError for `e`, or `e` itself when it is nothing a user can act on."""
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo, status = self.repo_id, _status(e)
        if isinstance(e, GatedRepoError):
            return UserError(
                f"{repo} is gated: accept its terms on its Hub page, then {TOKEN_HINT} "
                "(a token of an account with access)"
            )
        if isinstance(e, RevisionNotFoundError):
            return UserError(f"revision {self.revision!r} not found in {repo}")
        if isinstance(e, RepositoryNotFoundError):  # the Hub answers 401 or 404 for these
            return UserError(
                f"repo {repo} not found on {self.endpoint} (check the id; if it is private, "
                f"{TOKEN_HINT})"
            )
        if status in (401, 403):
            return UserError(f"access to {repo} denied ({status}); {TOKEN_HINT}")
        if not (_hub_down(e) or _broken_transfer(e)):
            return e
        if self.reached:
            return UserError(
                f"the download of {repo} was interrupted ({_reason(e)}); run the same command "
                "again to resume: the files already downloaded are kept in the Hugging Face cache"
            )
        return UserError(
            f"cannot reach the Hugging Face Hub at {self.endpoint} ({_reason(e)}); check the "
            "network, or convert a local Hugging Face folder with --from_dir PATH"
        )


def _status(e: Exception) -> Optional[int]:
    return getattr(getattr(e, "response", None), "status_code", None)


def _reason(e: BaseException) -> str:
    """A short one-line account of `e`, or of its cause when `e` says nothing itself."""
    chain = _chain(e)
    deepest = next((c for c in reversed(chain) if str(c).strip()), e)
    text = " ".join(str(deepest).split()) or type(deepest).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _hub_down(e: BaseException) -> bool:
    """No usable answer from the Hub: unreachable, or a server error."""
    return _unreachable(e) or (_status(e) or 0) >= 500


def _unreachable(e: BaseException) -> bool:
    """No answer from the Hub at all: refused, no route, timed out, or offline mode."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(e, LocalEntryNotFoundError):  # how hf_hub_download reports a failed HEAD
        return True
    # By name: the HTTP client below huggingface_hub differs between its versions (requests,
    # httpx, httpx2), and all of them name these errors alike.
    names = ("ConnectError", "ConnectTimeout", "OfflineModeIsEnabled")
    return any(
        isinstance(c, ConnectionRefusedError) or type(c).__name__ in names for c in _chain(e)
    )


def _broken_transfer(e: BaseException) -> bool:
    """A connection that broke or stalled while an answer was coming in."""
    names = (
        "RemoteProtocolError",
        "ReadError",
        "ReadTimeout",
        "WriteError",
        "ChunkedEncodingError",
    )
    return any(
        type(c).__name__ in names
        or isinstance(c, (ConnectionError, TimeoutError))
        or "Consistency check failed" in str(c)
        for c in _chain(e)
    )


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain
