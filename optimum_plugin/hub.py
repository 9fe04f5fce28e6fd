"""Hub export for all three methods: model cards, pushing a folder as one atomic commit, resolving repo ids.

    card = model_card(spec, "alice/smollm2-rotkv2")             # huggingface_hub.ModelCard (README.md)
    result = push_to_hub("out/", "alice/smollm2-rotkv2", token=..., private=True, revision="main")
    folder = resolve_folder("alice/smollm2-rotkv2", revision="v1")  # a local snapshot (HF cache), or the folder

Pushing (:func:`push_to_hub`):

1. the token is checked first with ``whoami`` (a missing, rejected or read-only token is a ``ValueError`` that
   says which flag or variable to set, before anything is uploaded);
2. ``create_repo(exist_ok=True)`` (``private`` applies when the repo is new) and, for ``revision`` other than
   ``main``, ``create_branch(exist_ok=True)``;
3. every file of the folder goes into **one** ``create_commit``: the blobs are uploaded first (LFS or Xet, with
   ``huggingface_hub``'s progress bars), then one commit makes them visible together. The Hub applies a commit
   atomically, so a failure at any point leaves the revision where it was: never half a model. (``upload_folder``
   would split a large folder into several commits when ``hf_xet`` is installed, which is why it is not used.)
4. transient failures (HTTP 429/5xx, dropped connections) are retried ``retries`` times with exponential waits;
   blobs that reached the server before a failure are not sent again (the LFS batch answer skips them). After the
   commit, the remote file list is compared with the folder.

The local folder is only ever read. Files given in ``replace_files`` (for example a README rendered for the repo
id) are uploaded from memory in place of the folder's copy, which stays as it was.

Resolving (:func:`resolve_folder`) goes through ``snapshot_download``, so ``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE`` (cache only), revisions and the shared cache behave as everywhere else in the ecosystem.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "CardSpec",
    "HubPushError",
    "PushResult",
    "check_push_access",
    "human_bytes",
    "is_repo_id",
    "local_files",
    "model_card",
    "push_to_hub",
    "resolve_folder",
]

logger = logging.getLogger(__name__)

ROTKV_TAG = "rotkv"


class HubPushError(RuntimeError):
    """A push that failed after its retries. Nothing of it was committed and the local folder is unchanged."""


# ================================================================================================
# Model cards
# ================================================================================================
@dataclass
class CardSpec:
    """Everything a model card says about one quantized / exported model.

    Attributes:
        method: ``"RotateKV"``, ``"LRQ-DiT"`` or ``"HALO"``.
        title_suffix: appended to the card title (e.g. ``"2-bit KV cache"``).
        summary: one paragraph: what was done to which model.
        library_name, pipeline_tag, tags, license: Hub metadata (``rotkv`` and the method are always tagged).
        base_model: the Hub id of the model this one derives from, when known (a local source has none).
        config: the method's config (``to_dict()``), shown as JSON.
        calibration: what the statistics were computed on (source, amount), or None when no data was used.
        evaluation: rows ``{"metric", "data", "reference", "quantized"}`` (numbers; the ratio is computed) and
            optionally ``"reference_name"``, ``"lower_is_better"``.
        sizes: rows ``{"what", "bf16_bytes", "quantized_bytes"}``: storage against bf16.
        usage: ``(caption, language, code)``; ``{repo}`` in the code is replaced by the repo id or folder.
        command: the command line that produced the folder.
    """

    method: str
    summary: str
    library_name: str
    title_suffix: str = ""
    tags: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    base_model: str | None = None
    license: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    sizes: list[dict[str, Any]] = field(default_factory=list)
    usage: list[tuple[str, str, str]] = field(default_factory=list)
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tags"], d["usage"] = list(self.tags), [list(u) for u in self.usage]
        return d


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def human_bytes(n: int) -> str:
    """``n`` bytes in B, KiB, MiB or GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def model_card(spec: CardSpec, repo: str):
    """The README.md of a pushed model, as a ``huggingface_hub.ModelCard``.

    ``repo`` is what users type to load it (the repo id, or the local folder before a push); it replaces
    ``{repo}`` in ``spec.usage``. The YAML header carries ``base_model``, ``library_name``, ``pipeline_tag``,
    ``tags`` (always ``rotkv`` and the method) and ``license`` when given.
    """
    from huggingface_hub import ModelCard, ModelCardData

    tags = list(dict.fromkeys([ROTKV_TAG, spec.method.lower(), *spec.tags]))
    data = ModelCardData(base_model=spec.base_model, library_name=spec.library_name,
                         pipeline_tag=spec.pipeline_tag, tags=tags, license=spec.license)
    lines = [f"# {repo.rstrip('/').split('/')[-1]}" + (f": {spec.title_suffix}" if spec.title_suffix else ""), "",
             spec.summary, ""]
    if spec.usage:
        lines += ["## Use it", ""]
        for caption, lang, code in spec.usage:
            lines += [caption, "", f"```{lang}", code.replace("{repo}", repo).strip("\n"), "```", ""]
    if spec.evaluation:
        lines += ["## Evaluation", "", "Measured side by side in the run that produced this model.", "",
                  "| metric | data | reference | this model | ratio |", "|---|---|---|---|---|"]
        for row in spec.evaluation:
            ref, q = row["reference"], row["quantized"]
            ratio = f"{q / ref:.4f}" if isinstance(ref, (int, float)) and ref else "n/a"
            name = row.get("reference_name")
            lines.append(f"| {row['metric']} | {row.get('data', '')} | {_fmt(ref)}{f' ({name})' if name else ''} "
                         f"| {_fmt(q)} | {ratio} |")
        lines.append("")
    if spec.sizes:
        lines += ["## Size", ""]
        for s in spec.sizes:
            ratio = s["bf16_bytes"] / s["quantized_bytes"] if s["quantized_bytes"] else float("nan")
            lines.append(f"- {s['what']}: {human_bytes(s['quantized_bytes'])} against {human_bytes(s['bf16_bytes'])} "
                         f"in bf16 ({ratio:.2f}x smaller).")
        lines.append("")
    if spec.calibration is not None:
        lines += ["## Calibration data", "", "```json", json.dumps(spec.calibration, indent=2, sort_keys=True), "```",
                  ""]
    lines += [f"## {spec.method} configuration", "", "```json", json.dumps(spec.config, indent=2, sort_keys=True),
              "```", ""]
    if spec.command:
        lines += ["## How this model was made", "", "```bash", spec.command, "```", ""]
    try:
        from importlib.metadata import version

        made_with = f"rotkv {version('rotkv')}"
    except Exception:  # running from a source tree without installed metadata
        made_with = "rotkv"
    lines += [f"Made with {made_with}."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


# ================================================================================================
# Pushing
# ================================================================================================
@dataclass(frozen=True)
class PushResult:
    """What :func:`push_to_hub` committed."""

    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    url: str
    files: int
    bytes: int
    retries: int
    private: bool | None


def is_repo_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is not an existing local path and is shaped like a Hub repo id (``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    s = str(name)
    if Path(s).exists():
        return False
    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def local_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The files :func:`push_to_hub` would upload: ``{path in repo (posix): local path}``, sorted.

    Skips what ``huggingface_hub`` never uploads (``.git``, ``.cache/huggingface``) and partial files (``*.tmp``).
    """
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    root = Path(folder)
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    kept = filter_repo_objects(rel, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, "*.tmp"])
    return {r: root / r for r in kept}


def _transport_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        try:
            errs.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def _is_transient(exc: BaseException) -> bool:
    """HTTP 429 / 5xx or a transport failure anywhere in the exception's cause chain."""
    transport = _transport_errors()
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = _status(e)
        if code is not None:
            return code == 429 or code >= 500
        if isinstance(e, transport):
            return True
        e = e.__cause__ or e.__context__
    return False


def _endpoint(api) -> str:
    return api.endpoint.rstrip("/")


def _check_token(api, token: str | None) -> str:
    """Resolve the token and check it can write; returns the user name.

    Raises:
        ValueError: no token, a token the Hub rejects, or a read-only token.
    """
    from huggingface_hub import get_token
    from huggingface_hub.utils import HfHubHTTPError

    tok = token or get_token()
    if not tok:
        raise ValueError(
            "no Hugging Face token: pass token= (--token on the command line), set HF_TOKEN, or run "
            "`hf auth login` with a token that has write access"
        )
    try:
        info = api.whoami(token=tok)
    except HfHubHTTPError as e:
        if _status(e) in (401, 403):
            where = "--token / token=" if token else "HF_TOKEN or the token saved by `hf auth login`"
            raise ValueError(
                f"the Hub at {_endpoint(api)} rejected the token (HTTP {_status(e)}): check {where}; it must be a "
                "valid token with write access"
            ) from None
        raise
    role = (((info.get("auth") or {}).get("accessToken") or {}).get("role"))
    if role == "read":
        raise ValueError(
            f"the token of {info.get('name')!r} is read-only (role 'read'): pushing needs a token with write access "
            "(--token / token= or HF_TOKEN)"
        )
    return str(info.get("name"))


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def check_push_access(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> str:
    """Fail fast, before any long computation: ``repo_id`` is well formed and the token may write.

    Returns the user name. Raises ``ValueError`` as :func:`push_to_hub` would.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id ({e}): use 'namespace/name'") from None
    return _check_token(HfApi(endpoint=endpoint, token=token), token)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    replace_files: dict[str, bytes] | None = None,
    retries: int = 3,
    retry_wait: float = 1.0,
    endpoint: str | None = None,
    progress: bool = True,
) -> PushResult:
    """Upload every file of ``folder`` to ``repo_id`` as one commit (see the module docstring).

    Args:
        folder: the local folder (read only).
        repo_id: ``namespace/name``; created if missing (``private`` then applies).
        token: a write token (default: ``HF_TOKEN`` / the saved login).
        revision: the branch to commit to (created from ``main`` if missing); default ``main``.
        replace_files: ``{path in repo: content}`` uploaded instead of the folder's file of that path.
        retries: extra attempts after a transient failure (HTTP 429/5xx, network).
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` or huggingface.co).
        progress: show ``huggingface_hub``'s upload progress bars.
    Returns:
        a :class:`PushResult`.
    Raises:
        ValueError: a missing folder, an empty folder, a malformed repo id, or a missing / rejected / read-only
            token (nothing uploaded).
        HubPushError: the upload or commit still failed after ``retries`` retries (nothing committed).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder={str(folder)!r} is not a directory: pass the folder written by quantize()")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id ({e}): use 'namespace/name'") from None
    if retries < 0:
        raise ValueError(f"retries={retries}: must be >= 0")
    files = local_files(root)
    replace = dict(replace_files or {})
    if not files and not replace:
        raise ValueError(f"folder={str(folder)!r} holds no file to upload")
    branch = revision or "main"
    api = HfApi(endpoint=endpoint, token=token)

    retried = 0

    def with_retries(what: str, fn):
        nonlocal retried
        for i in range(retries + 1):
            retried += i > 0
            try:
                return fn()
            except Exception as e:  # classified below: only transient errors are retried
                if not _is_transient(e) or i == retries:
                    raise
                wait = retry_wait * 2**i
                logger.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(e).__name__,
                               str(e).splitlines()[0][:200], i + 1, retries, wait)
                time.sleep(wait)

    user = with_retries("token check", lambda: _check_token(api, token))
    logger.info("pushing %s to %s@%s on %s as %s", root, repo_id, branch, _endpoint(api), user)
    url = with_retries("create_repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    repo_id = url.repo_id or repo_id  # the Hub fills in the namespace of a bare name
    if branch != "main":
        with_retries("create_branch", lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
    try:
        head = api.repo_info(repo_id, revision=branch).sha
    except Exception:  # only used to state what a failure left in place
        head = None

    def ops():
        out = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f))
               for p, f in files.items() if p not in replace]
        out += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=bytes(b)) for p, b in replace.items()]
        return out

    total = sum(f.stat().st_size for p, f in files.items() if p not in replace) + sum(map(len, replace.values()))
    message = commit_message or f"Upload {len(files | replace)} files with rotkv"
    retried_before = retried
    try:
        with _progress_bars(progress):
            info = with_retries("commit", lambda: api.create_commit(
                repo_id, ops(), commit_message=message, commit_description=commit_description, revision=branch))
    except Exception as e:
        if isinstance(e, ValueError) and _status(e) is None:
            raise
        if _status(e) in (401, 403):
            raise ValueError(
                f"the token of {user!r} may not write to {repo_id} (HTTP {_status(e)}): push to a repo of your own "
                "namespace or use a token with write access to it (--token / token= or HF_TOKEN). Nothing was "
                "committed."
            ) from e
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            after = api.repo_info(repo_id, revision=branch).sha
        except Exception:  # the Hub may be unreachable now; then nothing can be said about the branch
            after = None
        if head is not None and after == head:
            state = f"Nothing was committed (a Hub commit is atomic: {branch} is still at {head})"
        else:
            # A commit whose answer was lost, or a concurrent push: say so rather than guess.
            state = f"{branch} is now at {after or 'an unknown commit'} (was {head}): check the repo"
        raise HubPushError(
            f"pushing {root} to {repo_id}@{branch} failed after {retried - retried_before + 1} attempt(s): {why}. "
            f"{state}; {root} is unchanged; push it again to retry (blobs already uploaded are not sent again)."
        ) from e
    remote = set(api.list_repo_files(repo_id, revision=info.oid))
    missing = sorted((set(files) | set(replace)) - remote)
    if missing:
        raise HubPushError(f"commit {info.oid} of {repo_id} lacks {missing[:5]}: the server lost files")
    try:
        is_private = api.repo_info(repo_id).private
    except Exception:  # informative only
        is_private = None
    result = PushResult(repo_id=repo_id, revision=branch, commit_oid=info.oid, commit_url=info.commit_url,
                        url=f"{_endpoint(api)}/{repo_id}", files=len(files | replace), bytes=total,
                        retries=retried, private=is_private)
    logger.info("pushed %d files (%s) to %s@%s: commit %s", result.files, human_bytes(total), repo_id, branch,
                info.oid)
    return result


# ================================================================================================
# Resolving repo ids
# ================================================================================================
def resolve_folder(model: str | os.PathLike, revision: str | None = None, *, token: str | None = None,
                   allow_patterns: list[str] | None = None, endpoint: str | None = None) -> Path:
    """A local folder holding ``model``: the folder itself, or the cached snapshot of a Hub repo id.

    Repo ids go through ``snapshot_download`` (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, the cache).

    Raises:
        ValueError: neither a folder nor a repo id; a repo that does not exist or is private without a token;
            an unknown revision; offline (or unreachable Hub) with nothing cached; ``revision`` with a folder.
    """
    p = Path(model)
    if p.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repo ids; {str(model)!r} is a local folder")
        return p
    if not is_repo_id(model):
        raise ValueError(f"{str(model)!r} is neither a local folder nor a Hub repo id ('namespace/name')")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(str(model), revision=revision, token=token, allow_patterns=allow_patterns,
                                      endpoint=endpoint))
    except RepositoryNotFoundError:
        raise ValueError(
            f"Hub repo {str(model)!r} does not exist or is private: check the id, and pass a token (--token or "
            "HF_TOKEN) for a private repo"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"Hub repo {str(model)!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode()
               else f"the Hub at {endpoint or constants.ENDPOINT} could not be reached")
        raise ValueError(
            f"{why} and {str(model)!r}@{revision or 'main'} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): download it once online ({e})"
        ) from None
