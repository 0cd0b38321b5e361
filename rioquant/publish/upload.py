"""Upload a release folder to the Hugging Face Hub with huggingface_hub, as `hf upload` does.

`HfApi.upload_folder` is huggingface_hub 2.x's large-folder path: with hf_xet installed (a hub
dependency) it streams, deduplicates, commits in batches and resumes an interrupted upload when run
again (what `upload_large_folder` did in 0.x/1.x); without it, one commit over the LFS protocol.
Only the listed files are sent (`allow_patterns`), so stray files in the folder never leave it. The
token comes from HF_TOKEN or `hf auth login` and is never printed: hub errors are reduced to one line
with any occurrence of it masked.
"""

import glob
import logging
from pathlib import Path

from rioquant.errors import PublishError

log = logging.getLogger(__name__)


def hub_url(repo_id: str, endpoint: str | None = None) -> str:
    from huggingface_hub import constants

    return f"{(endpoint or constants.ENDPOINT).rstrip('/')}/{repo_id}"


def upload_release(
    repo_id: str,
    folder: Path,
    paths: list[str],
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str,
    endpoint: str | None = None,
) -> str:
    """Create the repo (and branch) if missing, upload `paths` (relative to folder); the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = get_token()
    if not token:
        raise PublishError(f"{repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repository"
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision and revision != "main" and not revision.startswith("refs/"):  # as `hf upload --revision`
            step = f"create branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "upload"
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, allow_patterns=[glob.escape(p) for p in paths],
            commit_message=commit_message, revision=revision,
        )
    except Exception as err:  # HTTP errors, and the network errors of the hub's HTTP client (httpx2)
        if not isinstance(err, HfHubHTTPError | OSError) and not type(err).__module__.startswith("httpx"):
            raise
        message = (str(err).strip().splitlines() or [type(err).__name__])[0].replace(token, "***")
        raise PublishError(f"{hub_url(repo_id, endpoint)}: cannot {step} ({message})") from None
    return str(getattr(info, "commit_url", "") or hub_url(repo_id, endpoint))
