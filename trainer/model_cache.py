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

from trainer.config import BUILT_IN_MODELS, ConfigError, ModelConfig
from trainer.fetch_once import fetch_once
from trainer.sources import copy_folder, is_url

# The subfolders of a diffusers Stable Diffusion pipeline that training needs.
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")  # and these of an SDXL one
# Only the subfolders training reads: hub repos also hold multi-GB single-file
# checkpoints, fp16/non-EMA variants and Flax/ONNX/OpenVINO exports that would be
# downloaded for nothing (SDXL's unet/ alone holds four 10 GB copies of its weights).
HUB_ALLOW = ["model_index.json", *(f"{part}/*" for part in PIPELINE_PARTS + SDXL_PARTS)]
HUB_IGNORE = ["*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*fp16*", "*non_ema*", "*.pb", "*openvino*"]
DEFAULT_REVISION = "main"


def cache_folder(cache_dir: Path, source: str, revision: str | None) -> Path:
    """`org/name` at `rev` -> `<cache_dir>/org--name@rev`; a URL and a revision keep only
    safe characters (a revision `../../x` must not name a folder outside the cache)."""
    name = source.split("://", 1)[-1].strip("/").replace("/", "--")
    return cache_dir / f"{_safe(name)}@{_safe(revision or DEFAULT_REVISION)}"


def _safe(text: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in text)


def looks_like_hub_id(source: str) -> bool:
    return not (source.startswith(("/", ".", "~")) or source.count("/") > 1 or is_url(source))


def model_folder(config: ModelConfig) -> Path | None:
    """The local pipeline folder for `model.source` (fetched when needed); None for a built-in model."""
    if config.source in BUILT_IN_MODELS:
        return None
    if Path(config.source).is_dir() and not is_url(config.source):
        return Path(config.source)  # a local path stays a local path
    if is_url(config.source):
        return cached_copy(config, lambda folder: _copy_model_url(config.source, folder))
    if not looks_like_hub_id(config.source):
        raise ConfigError(f"model.source = {config.source!r}: no such folder; give `tiny`, `tiny-sdxl`, an existing "
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


def hub_files(config: ModelConfig, token: str | None) -> list[str]:
    """The files of the repo to fetch (`select_hub_files`); HUB_ALLOW when the hub cannot
    be listed (offline: snapshot_download then serves the cache, or says why it cannot)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return select_hub_files(HfApi(token=token).list_repo_files(config.source, revision=config.revision))
    except HfHubHTTPError:
        raise  # no such repo or revision, gated: download_from_hub names it
    except Exception:  # noqa: BLE001 - offline, DNS, proxy: each client library has its own error types
        return HUB_ALLOW


def select_hub_files(repo_files: list[str]) -> list[str]:
    """Pure: of a repo's files, model_index.json and the pipeline parts' files, without
    HUB_IGNORE's exports and variants, and without a part's PyTorch-pickle `.bin`
    weights where it has safetensors ones (SD 1.5 has both: 5 GB more for nothing).
    diffusers loads safetensors first."""
    from fnmatch import fnmatch

    wanted = [name for name in repo_files
              if (name == "model_index.json" or name.split("/")[0] in PIPELINE_PARTS + SDXL_PARTS)
              and not any(fnmatch(name, pattern) for pattern in HUB_IGNORE)]
    with_safetensors = {name.split("/")[0] for name in wanted if name.endswith(".safetensors")}
    return [name for name in wanted
            if not (name.split("/")[0] in with_safetensors and (name.endswith(".bin") or name.endswith(".bin.index.json")))]


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
    token = os.environ.get("HF_TOKEN") or None
    try:
        path = snapshot_download(
            config.source,
            revision=config.revision,
            local_dir=local_dir,
            allow_patterns=hub_files(config, token),
            ignore_patterns=HUB_IGNORE,
            token=token,
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
