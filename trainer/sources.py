"""Folders behind fsspec URLs (file://, memory://, https://, s3://, gs://, az://, ...),
copied to local disk: instance images from `data.instance_url`, a base model from a URL.

fsspec serves file:// and memory:// itself; the `storage` extra (in the trainer image)
adds s3fs, gcsfs, adlfs and aiohttp. A protocol whose package is missing is reported with
its name. Credentials and endpoints come from the environment, read by each backend's own
client (AWS_*, STORAGE_EMULATOR_HOST, AZURE_STORAGE_*, ...).
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any, Callable

from trainer.config import ConfigError, DataConfig
from trainer.fetch_once import fetch_once


def is_url(text: str) -> bool:
    return "://" in text


def open_url(url: str, key: str) -> tuple[Any, str]:
    """(filesystem, path inside it), or a ConfigError naming the key and what is missing:
    the protocol, its package, or what the backend needs to connect (credentials)."""
    import fsspec
    from fsspec.core import split_protocol

    # Each link of a chained URL (simplecache::s3://...) has its own backend.
    for link in url.split("::"):
        protocol = split_protocol(link)[0] or "file"
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as error:
            raise ConfigError(f"{key} = {url!r}: this protocol needs a package the trainer image lacks: {error}") from None
        except ValueError as error:
            raise ConfigError(f"{key} = {url!r}: not a URL fsspec knows ({error}); "
                              "use file://, https://, s3://, gs://, az://, ...") from None
    try:
        return fsspec.core.url_to_fs(url)
    except Exception as error:  # each backend has its own errors for an account it cannot reach
        raise ConfigError(f"{key} = {url!r}: cannot connect: {type(error).__name__}: {error} "
                          "(the store's credentials and endpoint come from the worker's environment: "
                          "see docs/inputs-and-outputs.md)") from None


def list_files(fs: Any, root: str, *, recursive: bool) -> list[str]:
    """Paths of the files under `root`, relative to it, sorted."""
    if recursive:
        found = fs.find(root)
    else:
        found = [entry["name"] for entry in fs.ls(root, detail=True) if entry.get("type") == "file"]
    base = root.rstrip("/")
    return sorted(posixpath.relpath(name, base) for name in found)


def copy_folder(url: str, destination: Path, key: str, *, recursive: bool,
                keep: Callable[[str], bool] = lambda relative: True) -> int:
    """Copy the files of the folder at `url` that `keep` accepts; returns how many."""
    fs, root = open_url(url, key)
    try:
        names = [name for name in list_files(fs, root, recursive=recursive) if keep(name)]
        # Every name checked before the first file is written.
        targets = [inside(destination, name, f"{key} = {url!r}") for name in names]
        for name, local in zip(names, targets):
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(posixpath.join(root.rstrip("/"), name), str(local))
    except ConfigError:
        raise
    except Exception as error:  # every backend has its own errors: name the key whatever they are
        raise ConfigError(f"{key} = {url!r}: cannot read it: {type(error).__name__}: {error}") from None
    return len(names)


def inside(destination: Path, relative: str, what: str) -> Path:
    """`destination / relative`, refused when it would land outside `destination`: a
    listing (an index page, a bucket's keys) is the store's to write, and a name such as
    `a/../../../x` would otherwise write over the shared model cache or another job's
    checkpoints."""
    local = (destination / relative).resolve()
    if posixpath.isabs(relative) or not local.is_relative_to(destination.resolve()):
        raise ConfigError(f"{what}: lists the file {relative!r}, which is outside the folder; refused "
                          "(a store whose listing reaches outside the folder is not safe to copy)")
    return destination / posixpath.normpath(relative)


def is_image_name(relative: str) -> bool:
    name = posixpath.basename(relative)
    return "/" not in relative and not name.startswith(".") and Path(name).suffix.lower() in DataConfig.IMAGE_SUFFIXES


def is_caption_name(relative: str) -> bool:
    """A caption file (data.caption_files) beside the photos."""
    return "/" not in relative and not relative.startswith(".") and relative.endswith(DataConfig.CAPTION_SUFFIX)


def fetch_instance_images(config: DataConfig) -> bool:
    """With `data.instance_url`, copy its images once into `data.instance_dir` (shared by
    every rank and node); returns True when this process copied them."""
    if config.instance_url is None:
        return False
    url = config.instance_url

    def fetch(folder: Path) -> None:
        wanted = (lambda name: is_image_name(name) or is_caption_name(name)) if config.caption_files else is_image_name
        if not copy_folder(url, folder, "data.instance_url", recursive=False, keep=wanted):
            raise ConfigError(
                f"data.instance_url = {url!r}: no images there (looked for {', '.join(sorted(DataConfig.IMAGE_SUFFIXES))}); "
                "upload the photos or fix the URL"
            )

    return fetch_once(config.instance_dir, fetch, what=url)
