"""Results out: the exported pipeline folder uploaded to `output.uri`.

- A local path (`file://`): copied under a temporary name beside the target and renamed
  into place, as `output.dir` itself is.
- An object store or other fsspec target (`s3://`, `gs://`, `memory://`, ...), which has
  no rename: `_COMPLETE` is removed first, the files are written with
  `model_index.json` last, and `_COMPLETE` is written after everything. A reader waits
  for `_COMPLETE`.
- `hf://org/repo`: one commit through huggingface_hub (atomic by nature), token from
  HF_TOKEN; the repo is created private when it does not exist.

A failed upload leaves the model in `output.dir`; the result, good or bad, is recorded
under `upload` in its run.json.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
from pathlib import Path
from typing import Any

from trainer.config import ConfigError
from trainer.export import RUN_FILE, publish_folder, write_run_json
from trainer.sources import open_url

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
COMPLETE_MARKER = "_COMPLETE"
# Written last (before the marker): diffusers' loaders look for it first.
INDEX_FILE = "model_index.json"


class UploadError(Exception):
    """The upload failed; the message names the target and the cause."""


def upload_model(folder: Path, uri: str) -> None:
    try:
        if uri.startswith(HF_SCHEME):
            upload_to_hub(folder, hub_repo_id(uri))
        else:
            upload_to_filesystem(folder, uri)
    except UploadError:
        raise
    except ConfigError as error:
        raise UploadError(str(error)) from None
    except Exception as error:  # every backend has its own errors: name the target whatever they are
        raise UploadError(f"output.uri = {uri!r}: upload failed: {type(error).__name__}: {error}") from None


def hub_repo_id(uri: str) -> str:
    repo_id = uri.removeprefix(HF_SCHEME).strip("/")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UploadError(f"output.uri = {uri!r}: expected hf://ORG/REPO, e.g. hf://my-org/sks-dog")
    return repo_id


def upload_to_hub(folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get("HF_TOKEN") or None)
    api.create_repo(repo_id, exist_ok=True, private=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="DreamBooth fine-tuned pipeline")


def upload_to_filesystem(folder: Path, uri: str) -> None:
    fs, root = open_url(uri, "output.uri")
    if "file" in _protocols(fs):
        publish_folder(Path(root), lambda staging: shutil.copytree(folder, staging))
        return
    root = root.rstrip("/")
    marker = posixpath.join(root, COMPLETE_MARKER)
    if fs.exists(marker):
        fs.rm(marker)
    files = sorted((path for path in folder.rglob("*") if path.is_file()), key=lambda path: path.name == INDEX_FILE)
    for path in files:
        fs.put_file(str(path), posixpath.join(root, path.relative_to(folder).as_posix()))
    with fs.open(marker, "w") as handle:
        handle.write(json.dumps({"files": len(files)}))


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def upload_and_record(folder: Path, uri: str) -> dict[str, Any]:
    """Upload, then record the outcome in the folder's run.json; never raises UploadError."""
    try:
        upload_model(folder, uri)
        record: dict[str, Any] = {"uri": uri, "ok": True}
        log.info("uploaded %s to %s", folder, uri)
    except UploadError as error:
        record = {"uri": uri, "ok": False, "error": f"{error}; the model is kept at {folder}"}
    run = json.loads((folder / RUN_FILE).read_text())
    run["upload"] = record
    write_run_json(folder, run)
    return record
