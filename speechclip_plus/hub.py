"""Share model files on the Hugging Face Hub and load them back as ``hf://ORG/NAME[@REVISION]``.

Addresses follow huggingface_hub's URI grammar (``huggingface_hub.parse_hf_uri``):
``hf://ORG/NAME`` (branch ``main``), ``hf://ORG/NAME@REVISION`` (a branch, tag or commit hash: pin a
commit for reproducible results), ``hf://ORG/NAME[@REVISION]/path/file`` (another file than ``model.pt``).
Only model repositories are accepted.

Downloads go through ``hf_hub_download``: huggingface_hub's cache (``HF_HUB_CACHE`` / ``HF_HOME``), its
offline mode (``HF_HUB_OFFLINE=1``: only what is cached, by branch/tag ref or commit) and its
authentication. A downloaded model file is then read like a local one (``model_file.read_model_file``:
``weights_only``, content digest), so a Hub model gets the same safety checks.

``push_model`` uploads a model file as ``model.pt`` and a generated model card as ``README.md`` in one
commit (``HfApi.create_repo`` + ``HfApi.create_commit``), so the card never describes another file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

SCHEME = "hf://"
MODEL_FILENAME = "model.pt"
CARD_FILENAME = "README.md"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class HubError(ValueError):
    """A Hub address, download or upload that failed (message names the address)."""


def is_hub_uri(path: Any) -> bool:
    """True for ``hf://...`` strings (checked without importing huggingface_hub)."""
    return isinstance(path, str) and path.startswith(SCHEME)


@dataclass(frozen=True)
class HubFile:
    """A file in a Hub model repository: ``repo_id``, ``revision`` (None = main) and ``filename``."""

    repo_id: str
    revision: Optional[str]
    filename: str


def parse_uri(uri: str, default_filename: Optional[str] = MODEL_FILENAME) -> HubFile:
    """``hf://ORG/NAME[@REVISION][/PATH]`` -> ``HubFile``; the file defaults to ``default_filename``."""
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    if not is_hub_uri(uri):
        raise HubError(f"{uri}: not a Hugging Face Hub address (expected hf://ORG/NAME[@REVISION])")
    try:
        parsed = parse_hf_uri(uri)
    except HfUriError as e:
        raise HubError(f"{uri}: not a valid hf://ORG/NAME[@REVISION] address ({e})") from None
    if parsed.type != "model":
        raise HubError(f"{uri}: a {parsed.type} repository; models are loaded from model repositories")
    filename = parsed.path_in_repo or default_filename
    if not filename:
        raise HubError(f"{uri}: name the file in the repository (hf://ORG/NAME[@REVISION]/path/to/file)")
    return HubFile(parsed.id, parsed.revision, filename)


def download(uri: str, cache_dir: Optional[str] = None, force: bool = False,
             default_filename: Optional[str] = MODEL_FILENAME) -> str:
    """Local path of the file ``uri`` names, from huggingface_hub's cache (downloaded when online and needed).

    ``force`` downloads again. Errors (offline and not cached, unknown repository / revision / file, HTTP
    failures) raise ``HubError`` naming the address.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from . import __version__

    ref = parse_uri(uri, default_filename)
    try:
        return hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision, cache_dir=cache_dir,
                               force_download=force, library_name="speechclip_plus", library_version=__version__)
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        mode = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise HubError(f"{uri}: {ref.filename} of revision {ref.revision or 'main'} is not in the Hugging Face "
                       f"cache {where} and {mode}; download it once online (or pin a cached commit)") from None
    except RevisionNotFoundError:
        raise HubError(f"{uri}: repository {ref.repo_id} has no revision {ref.revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{uri}: no model repository {ref.repo_id} (or it is private/gated and you are not "
                       "logged in: `hf auth login` or HF_TOKEN)") from None
    except EntryNotFoundError:
        raise HubError(f"{uri}: repository {ref.repo_id} has no file {ref.filename}") from None
    except (HfHubHTTPError, OSError) as e:
        raise HubError(f"{uri}: Hub request failed: {type(e).__name__}: {e}") from None


def snapshot_commit(path: str, filename: str = MODEL_FILENAME) -> Optional[str]:
    """The commit hash of a file downloaded into the cache (``.../snapshots/<commit>/<filename>``)."""
    folder = path
    for _ in filename.split("/"):
        folder = os.path.dirname(folder)
    commit = os.path.basename(folder)
    if os.path.basename(os.path.dirname(folder)) == "snapshots" and _COMMIT_RE.match(commit):
        return commit
    return None


def fetch_model(uri: str, force: bool = False) -> Dict[str, Any]:
    """Download a model file; returns ``{"path", "uri", "repo_id", "revision", "commit"}``."""
    ref = parse_uri(uri)
    path = download(uri, force=force)
    return {"path": path, "uri": uri, "repo_id": ref.repo_id, "revision": ref.revision,
            "commit": snapshot_commit(path, ref.filename)}


# ---------------------------------------------------------------------------------------------- sharing
def validate_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` as huggingface_hub accepts it, else ``HubError``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _validate

    try:
        _validate(repo_id)
    except HFValidationError as e:
        raise HubError(f"--push_to_hub {repo_id!r}: not a valid repository id ORG/NAME ({e})") from None
    if repo_id.count("/") != 1:
        raise HubError(f"--push_to_hub {repo_id!r}: expected ORG/NAME (your user name or an organisation)")
    return repo_id


_VARIANTS = {"p": "SpeechCLIP parallel (p)", "c": "SpeechCLIP cascaded (c)", "cplus": "SpeechCLIP+ cascaded+ (c+)",
             "h": "SpeechCLIP+ hybrid (h)", "hplus": "SpeechCLIP+ hybrid+ (h+)"}


def model_card(repo_id: str, config: Dict[str, Any], meta: Optional[Dict[str, Any]] = None,
               results_md: Optional[str] = None) -> str:
    """The README.md of a shared model: metadata, usage, model summary, data, results table, full config."""
    from huggingface_hub import ModelCard, ModelCardData

    from .config import dump_config

    m, meta = config["model"], dict(meta or {})
    train = config.get("train", {})
    data = ModelCardData(library_name="speechclip_plus", pipeline_tag="feature-extraction",
                         tags=["speechclip", "speechclip-plus", "speech", "audio", "visually-grounded-speech",
                               "image-retrieval", "s3prl", f"variant-{m['variant']}"])
    enc = m["encoder"]
    rows = [("variant", f"`{m['variant']}`: {_VARIANTS.get(m['variant'], m['variant'])}"),
            ("speech upstream (frozen)", f"`{m['upstream']['name']}` (s3prl)"),
            ("CLIP (frozen)", f"`{os.path.basename(str(m['clip']['name']))}` (open_clip)"),
            ("attention block", f"{enc['type']}, {enc['n_heads']} heads"),
            ("retrieval branch", f"`{m.get('retrieval_branch') or 'variant default'}`")]
    ref = meta.get("reference")
    if isinstance(ref, dict):
        source = (f"imported from the official checkpoint `{ref.get('checkpoint')}` (sha256 `{ref.get('sha256')}`, "
                  f"step {ref.get('global_step')}) with `python -m speechclip_plus.bin.import_reference`")
    else:
        def base(p: Any) -> str:
            return os.path.basename(os.path.normpath(str(p))) if p else "n/a"

        source = (f"trained with speechclip_plus: experiment `{meta.get('exp', 'n/a')}`, checkpoint "
                  f"`{meta.get('checkpoint', 'n/a')}` (step {meta.get('step', 'n/a')}); training data "
                  f"`{base(train.get('train_data'))}`, validation data `{base(train.get('valid_data'))}`")
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    results = results_md.strip() if results_md and results_md.strip() else \
        "Not scored yet (recipe stage 5, `python -m speechclip_plus.bin.score`, writes the table)."
    body = f"""
# {repo_id}

A {_VARIANTS.get(m['variant'], m['variant'])} model: speech embeddings aligned with images through a frozen
CLIP (SpeechCLIP+, arXiv 2402.06959). Source: {source}.

## Use

```python
from speechclip_plus import SpeechCLIPPlus
m = SpeechCLIPPlus.from_pretrained("hf://{repo_id}")   # pin a commit with hf://{repo_id}@<commit>
emb = m.embed_speech(["a.wav"])                         # (N, E) unit norm
```

SUPERB (s3prl's downstream runner through the speechclip_plus launcher):

```bash
python -m speechclip_plus.superb -m train -u speechclip_plus -k hf://{repo_id} -d <task> -c <config> -p <dir>
```

## Model

{table}

## Results

{results}

## Configuration

```yaml
{dump_config(config).rstrip()}
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_model(model_file: str, repo_id: str, card: str, private: bool = False,
               commit_message: Optional[str] = None, api: Any = None) -> str:
    """Upload ``model_file`` as ``model.pt`` and ``card`` as ``README.md`` in one commit; returns its URL.

    ``api``: an ``HfApi`` (default: a new one, with huggingface_hub's own token resolution).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    validate_repo_id(repo_id)
    api = api if api is not None else HfApi()
    operations = [CommitOperationAdd(path_in_repo=MODEL_FILENAME, path_or_fileobj=model_file),
                  CommitOperationAdd(path_in_repo=CARD_FILENAME, path_or_fileobj=card.encode("utf-8"))]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=commit_message or
                                 f"Upload {os.path.basename(model_file)} and its model card (speechclip_plus)",
                                 repo_type="model")
    except OSError as e:  # HTTP errors, no connection, HF_HUB_OFFLINE=1 (huggingface_hub's are OSErrors)
        raise HubError(f"push to {repo_id} failed: {type(e).__name__}: {e}") from None
    return str(getattr(info, "commit_url", info))
