"""The base model as a local folder: fetched once per cache, not once per process.

With `model.cache_dir` set, a hub id or a URL is fetched into
`<cache_dir>/<id with / as -->@<revision>` through `fetch_once` (lock + atomic rename),
so many ranks on many nodes sharing one volume download it once and never read a
half-written copy. A revision such as `main` is fetched once and then kept: pin a
commit for reproducible runs, delete the folder to refresh it.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.config import ConfigError, ModelConfig
from trainer.fetch_once import fetch_once
from trainer.sources import copy_folder, is_url

# The subfolders of a diffusers Stable Diffusion pipeline that training needs.
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Only the subfolders training reads: hub repos also hold multi-GB single-file
# checkpoints, fp16/non-EMA variants and Flax/ONNX exports that would be downloaded for nothing.
HUB_ALLOW = ["model_index.json", *(f"{part}/*" for part in PIPELINE_PARTS)]
HUB_IGNORE = ["*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*fp16*", "*non_ema*", "*.pb"]
DEFAULT_REVISION = "main"


def cache_folder(cache_dir: Path, source: str, revision: str | None) -> Path:
    """`org/name` at `rev` -> `<cache_dir>/org--name@rev`; a URL keeps only safe characters."""
    name = source.split("://", 1)[-1].strip("/").replace("/", "--")
    name = "".join(char if char.isalnum() or char in "-_." else "_" for char in name)
    return cache_dir / f"{name}@{revision or DEFAULT_REVISION}"


def looks_like_hub_id(source: str) -> bool:
    return not (source.startswith(("/", ".", "~")) or source.count("/") > 1 or is_url(source))


def model_folder(config: ModelConfig) -> Path | None:
    """The local pipeline folder for `model.source` (fetched when needed); None for `tiny`."""
    if config.source == "tiny":
        return None
    if Path(config.source).is_dir() and not is_url(config.source):
        return Path(config.source)  # a local path stays a local path
    if is_url(config.source):
        return cached_copy(config, lambda folder: _copy_model_url(config.source, folder))
    if not looks_like_hub_id(config.source):
        raise ConfigError(f"model.source = {config.source!r}: no such folder; give `tiny`, an existing "
                          "diffusers folder, a URL or a hub id")
    if config.cache_dir is None:
        return download_from_hub(config, None)
    return cached_copy(config, lambda folder: download_from_hub(config, folder))


def cached_copy(config: ModelConfig, fetch) -> Path:
    if config.cache_dir is None:
        raise ConfigError(f"model.source = {config.source!r} is a URL: set model.cache_dir (where it is copied to)")
    target = cache_folder(config.cache_dir, config.source, config.revision)
    fetch_once(target, fetch, what=f"{config.source}@{config.revision or DEFAULT_REVISION}")
    return target


def _copy_model_url(url: str, folder: Path) -> None:
    if not copy_folder(url, folder, "model.source", recursive=True):
        raise ConfigError(f"model.source = {url!r}: the folder is empty or missing; give a diffusers pipeline folder")


def download_from_hub(config: ModelConfig, local_dir: Path | None) -> Path:
    """Fetch the pipeline files into `local_dir`, or into huggingface_hub's own cache when
    None. The token comes from HF_TOKEN, as the operator sets it. A failure names the
    model, the revision and the cause."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"model.source = {config.source!r} (revision {config.revision or DEFAULT_REVISION})"
    try:
        path = snapshot_download(
            config.source,
            revision=config.revision,
            local_dir=local_dir,
            allow_patterns=HUB_ALLOW,
            ignore_patterns=HUB_IGNORE,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except GatedRepoError:
        raise ConfigError(f"{where}: access denied (gated model); accept its license and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}: not found on the hub, or private without a valid HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{where}: no such revision") from None
    except LocalEntryNotFoundError:
        raise ConfigError(f"{where}: the hub cannot be reached (offline?) and the model is not in the cache") from None
    except OSError as error:
        raise ConfigError(f"{where}: download failed: {error}") from None
    return Path(path)
