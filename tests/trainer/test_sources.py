"""Photos from where users have them (a URL, a ConfigMap mount) and the model out to a
URL: real fsspec backends against real or emulated peers (file://, memory://, an HTTP
server, moto's S3, the GCS emulator, Azurite), and one real training run between S3 and GCS."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import huggingface_hub.constants
import pytest

from tests.conftest import INSTANCE_IMAGES, REPO, tiny_config, write_config
from tests.trainer.object_stores import emulated_bucket, forget_filesystems, http_folder, private_ca_and_server_context
from trainer.config import ConfigError, DataConfig
from trainer.data import list_images
from trainer.fetch_once import FETCH_RECORD
from trainer.publish import COMPLETE_MARKER, UploadError, upload_and_record, upload_model
from trainer.sources import copy_folder, fetch_instance_images

PHOTOS = sorted(path.name for path in INSTANCE_IMAGES.iterdir() if path.suffix == ".png")


def data_config(instance_dir: Path, url: str) -> DataConfig:
    return DataConfig(instance_dir=instance_dir, instance_url=url, instance_prompt="a photo of sks robot")


@pytest.fixture
def memory_folder():
    """A fresh folder on fsspec's in-memory filesystem (lives only in this process)."""
    fs = fsspec.filesystem("memory")
    root = f"/test-{uuid.uuid4().hex[:8]}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_photos_from_a_memory_url_are_copied_once(tmp_path, memory_folder):
    fs, root = memory_folder
    for name in PHOTOS:
        fs.pipe(f"{root}/{name}", (INSTANCE_IMAGES / name).read_bytes())
    fs.pipe(f"{root}/notes.txt", b"not a photo")
    config = data_config(tmp_path / "instance-images", f"memory://{root}")
    assert fetch_instance_images(config) is True
    assert [path.name for path in list_images(config.instance_dir, "k")] == PHOTOS
    assert not (config.instance_dir / "notes.txt").exists()
    assert json.loads((config.instance_dir / FETCH_RECORD).read_text())["source"] == f"memory://{root}"
    assert fetch_instance_images(config) is False  # already on the volume


def test_with_caption_files_the_captions_are_copied_beside_the_photos(tmp_path, memory_folder):
    fs, root = memory_folder
    fs.pipe(f"{root}/{PHOTOS[0]}", (INSTANCE_IMAGES / PHOTOS[0]).read_bytes())
    caption = Path(PHOTOS[0]).with_suffix(".txt").name
    fs.pipe(f"{root}/{caption}", b"sks robot waving")
    fs.pipe(f"{root}/.hidden.txt", b"an editor's temporary")
    config = DataConfig(instance_dir=tmp_path / "images", instance_url=f"memory://{root}",
                        instance_prompt="a photo of sks robot", caption_files=True)
    assert fetch_instance_images(config) is True
    assert sorted(path.name for path in config.instance_dir.iterdir() if not path.name.startswith(".")) == sorted(
        [PHOTOS[0], caption])
    assert (config.instance_dir / caption).read_text() == "sks robot waving"


def test_an_empty_image_set_names_the_key_and_the_url(tmp_path, memory_folder):
    fs, root = memory_folder
    fs.pipe(f"{root}/notes.txt", b"not a photo")
    with pytest.raises(ConfigError, match=rf"data\.instance_url = 'memory://{root}': no images there"):
        fetch_instance_images(data_config(tmp_path / "images", f"memory://{root}"))
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_url_names_the_key_and_the_url(tmp_path):
    url = f"file://{tmp_path}/nowhere"
    with pytest.raises(ConfigError, match=r"data\.instance_url = .*nowhere.*cannot read it: FileNotFoundError"):
        fetch_instance_images(data_config(tmp_path / "images", url))


def test_a_protocol_without_its_package_names_the_package(tmp_path):
    # Oracle Cloud's backend (ocifs) is not in the storage extra.
    with pytest.raises(ConfigError, match=r"data\.instance_url = 'oci://bucket@tenancy/photos'.*Install ocifs"):
        fetch_instance_images(data_config(tmp_path / "images", "oci://bucket@tenancy/photos"))


def test_a_store_without_credentials_says_where_they_come_from(tmp_path, monkeypatch):
    """adlfs refuses to start without an account; that is not an unknown URL."""
    for name in [name for name in os.environ if name.startswith("AZURE_STORAGE_")]:
        monkeypatch.delenv(name)
    forget_filesystems()
    cause = r"cannot connect: ValueError: .*connection_string or account_name.*from the worker's environment"
    with pytest.raises(ConfigError, match=r"data\.instance_url = 'az://photos/sks': " + cause):
        fetch_instance_images(data_config(tmp_path / "images", "az://photos/sks"))
    record = upload_and_record(exported_folder(tmp_path), "az://models/sks-robot")
    assert record["ok"] is False and re.match(r"output\.uri = 'az://models/sks-robot': " + cause, record["error"])
    assert list(tmp_path.iterdir()) == [tmp_path / "model"]


BUCKET_SCHEMES = ["s3", "gs", "az"]


@pytest.fixture(params=["file", "http", *BUCKET_SCHEMES])
def photo_url(request, tmp_path, monkeypatch):
    """The four photos, a text file and a photo in a subfolder, behind one kind of URL."""
    files = {name: (INSTANCE_IMAGES / name).read_bytes() for name in PHOTOS}
    files |= {"notes.txt": b"not a photo", "more/extra.png": files[PHOTOS[0]]}
    kind = request.param
    if kind in BUCKET_SCHEMES:
        with emulated_bucket(kind, monkeypatch) as (fs, bucket):
            for relative, data in files.items():
                fs.pipe(f"{bucket}/photos/{relative}", data)
            yield f"{kind}://{bucket}/photos"
        return
    for relative, data in files.items():
        (tmp_path / "photos" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / relative).write_bytes(data)
    if kind == "file":
        yield f"file://{tmp_path}/photos"
    else:
        with http_folder(tmp_path) as root:
            yield f"{root}/photos/"


def test_the_top_level_photos_are_copied_from_every_kind_of_url(photo_url, tmp_path):
    config = data_config(tmp_path / "instance-images", photo_url)
    assert fetch_instance_images(config) is True
    assert sorted(path.name for path in config.instance_dir.iterdir()) == sorted([FETCH_RECORD, *PHOTOS])
    for name in PHOTOS:
        assert (config.instance_dir / name).read_bytes() == (INSTANCE_IMAGES / name).read_bytes()


@pytest.mark.parametrize("scheme", BUCKET_SCHEMES)
def test_a_bucket_that_does_not_exist_names_the_key_the_url_and_the_cause(scheme, tmp_path, monkeypatch):
    url = f"{scheme}://no-such-bucket/photos"
    with emulated_bucket(scheme, monkeypatch):
        with pytest.raises(ConfigError, match=rf"data\.instance_url = '{url}': cannot read it: \w+"):
            fetch_instance_images(data_config(tmp_path / "images", url))
    assert list(tmp_path.iterdir()) == []


# As a worker starts: aiohttp reads the CA bundle (SSL_CERT_FILE) once, when it is imported.
FETCH_IN_A_NEW_PROCESS = """
import sys
from pathlib import Path
from trainer.config import ConfigError, DataConfig
from trainer.sources import copy_folder, fetch_instance_images
try:
    fetch_instance_images(DataConfig(instance_dir=Path(sys.argv[2]), instance_url=sys.argv[1], instance_prompt="p"))
except ConfigError as error:
    sys.exit(f"error: {error}")
"""


def test_https_photos_from_a_server_a_private_ca_signed_once_the_workers_trust_it(tmp_path):
    """An internal web server with a company CA's certificate: refused, with the cause,
    until SSL_CERT_FILE names that CA (a key of the credentials Secret, mounted as a file)."""
    ca, server_context = private_ca_and_server_context(tmp_path)
    (tmp_path / "site" / "photos").mkdir(parents=True)
    for name in PHOTOS:
        shutil.copy(INSTANCE_IMAGES / name, tmp_path / "site" / "photos" / name)
    environment = {key: value for key, value in os.environ.items() if key not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}

    def fetch(url: str, destination: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", FETCH_IN_A_NEW_PROCESS, url, str(destination)], cwd=REPO,
                              env={**environment, **extra}, capture_output=True, text=True, timeout=120)

    with http_folder(tmp_path / "site", tls=server_context) as root:
        url = f"{root}/photos/"
        refused = fetch(url, tmp_path / "refused")
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert f"error: data.instance_url = '{url}': cannot read it: " in refused.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr
        assert not (tmp_path / "refused").exists()

        trusted = fetch(url, tmp_path / "trusted", SSL_CERT_FILE=str(ca))
        assert trusted.returncode == 0, trusted.stderr[-3000:]
    for name in PHOTOS:
        assert (tmp_path / "trusted" / name).read_bytes() == (INSTANCE_IMAGES / name).read_bytes()


def test_a_listing_that_reaches_outside_the_folder_is_refused_and_writes_nothing_there(tmp_path):
    # A model folder is copied recursively from whatever its store lists: an index page
    # naming `a/../../../escaped.txt` would write beside the model cache (the claim's
    # other models, other jobs' checkpoints).
    site = tmp_path / "site"
    (site / "model" / "a").mkdir(parents=True)
    (site / "escaped.txt").write_text("not yours")
    (site / "model" / "model_index.json").write_text("{}")
    (site / "model" / "index.html").write_text(
        '<a href="model_index.json">model_index.json</a> <a href="a/../../../escaped.txt">x</a>')
    destination = tmp_path / "cache" / "staging" / "model"
    destination.mkdir(parents=True)
    with http_folder(site) as root, pytest.raises(ConfigError) as caught:
        copy_folder(f"{root}/model/", destination, "model.source", recursive=True)
    assert "outside the folder; refused" in str(caught.value) and "escaped.txt" in str(caught.value)
    assert sorted(path.name for path in tmp_path.rglob("escaped.txt")) == ["escaped.txt"]  # the site's own only
    assert not (destination / "model_index.json").exists()  # refused before anything was written


def test_a_configmap_mount_reads_only_its_keys(tmp_path):
    """The kubelet's layout: keys are symlinks into a timestamped folder behind `..data`."""
    mount = tmp_path / "instance-images"
    versioned = mount / "..2026_11_26_18_00_00.123456789"
    versioned.mkdir(parents=True)
    for name in PHOTOS:
        shutil.copy(INSTANCE_IMAGES / name, versioned / name)
    (mount / "..data").symlink_to(versioned.name)
    for name in PHOTOS:
        (mount / name).symlink_to(f"..data/{name}")
    assert [path.name for path in list_images(mount, "data.instance_dir")] == PHOTOS


def exported_folder(root: Path) -> Path:
    folder = root / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.safetensors").write_bytes(b"w" * 100)
    (folder / "model_index.json").write_text("{}")
    (folder / "run.json").write_text(json.dumps({"final_step": 6}))
    return folder


def test_upload_to_memory_writes_the_marker_last(tmp_path, memory_folder):
    fs, root = memory_folder
    fs.pipe(f"{root}/out/{COMPLETE_MARKER}", b"from an older upload")
    record = upload_and_record(exported_folder(tmp_path), f"memory://{root}/out")
    assert record == {"uri": f"memory://{root}/out", "ok": True}
    assert fs.cat(f"{root}/out/unet/weights.safetensors") == b"w" * 100
    assert json.loads(fs.cat(f"{root}/out/{COMPLETE_MARKER}")) == {"files": 3}
    assert json.loads((tmp_path / "model" / "run.json").read_text())["upload"]["ok"] is True


@pytest.mark.parametrize("scheme", BUCKET_SCHEMES)
def test_an_upload_to_a_bucket_holds_every_file_and_then_the_marker(scheme, tmp_path, monkeypatch):
    with emulated_bucket(scheme, monkeypatch) as (fs, bucket):
        fs.pipe(f"{bucket}/sks-robot/{COMPLETE_MARKER}", b"from an older upload")
        uri = f"{scheme}://{bucket}/sks-robot"
        assert upload_and_record(exported_folder(tmp_path), uri) == {"uri": uri, "ok": True}
        fs.invalidate_cache()
        uploaded = [f"{bucket}/sks-robot/{name}" for name in
                    (COMPLETE_MARKER, "model_index.json", "run.json", "unet/weights.safetensors")]
        assert sorted(fs.find(f"{bucket}/sks-robot")) == uploaded
        assert fs.cat(f"{bucket}/sks-robot/unet/weights.safetensors") == b"w" * 100
        assert json.loads(fs.cat(f"{bucket}/sks-robot/{COMPLETE_MARKER}")) == {"files": 3}


def test_upload_to_a_local_path_replaces_the_folder_atomically(tmp_path):
    target = tmp_path / "published"
    (target / "stale").mkdir(parents=True)
    upload_model(exported_folder(tmp_path), f"file://{target}")
    assert sorted(path.name for path in target.iterdir()) == ["model_index.json", "run.json", "unet"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "published"]  # no temporaries


def test_a_failed_upload_keeps_the_model_and_says_where(tmp_path):
    (tmp_path / "a-file").write_text("")
    folder = exported_folder(tmp_path)
    record = upload_and_record(folder, f"file://{tmp_path}/a-file/model")
    assert record["ok"] is False
    assert f"output.uri = 'file://{tmp_path}/a-file/model'" in record["error"]
    assert f"the model is kept at {folder}" in record["error"]
    assert json.loads((folder / "run.json").read_text())["upload"] == record
    assert (folder / "unet" / "weights.safetensors").exists()


def test_hub_upload_needs_org_and_repo(tmp_path):
    with pytest.raises(UploadError, match=r"output\.uri = 'hf://just-a-name': expected hf://ORG/REPO"):
        upload_model(exported_folder(tmp_path), "hf://just-a-name")


def test_an_unreachable_hub_fails_the_upload_with_the_uri(tmp_path, monkeypatch):
    # A closed local port as the hub endpoint: huggingface_hub's real client, no network.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UploadError, match=r"output\.uri = 'hf://my-org/sks-robot': upload failed"):
        upload_model(exported_folder(tmp_path), "hf://my-org/sks-robot")


@dataclass
class UrlRuns:
    root: Path
    failed: subprocess.CompletedProcess
    failed_run: dict
    retried: subprocess.CompletedProcess
    published: Any  # the GCS filesystem the retry uploaded to
    published_uri: str


@pytest.fixture(scope="module")
def url_runs(tmp_path_factory):
    """Real training as a worker pod runs it, its storage credentials in its environment:
    photos from an S3 bucket, the model out to a file:// URL that cannot be written
    (exit 3), then the retry the operator makes, to a GCS bucket."""
    root = tmp_path_factory.mktemp("url-run")
    (root / "a-file").write_text("")
    with (pytest.MonkeyPatch.context() as environment, emulated_bucket("s3", environment) as (s3, photo_bucket),
          emulated_bucket("gs", environment) as (gs, model_bucket)):
        s3.put(str(INSTANCE_IMAGES) + "/", f"{photo_bucket}/photos/", recursive=True)
        config = tiny_config(
            root,
            data={"instance_dir": str(root / "instance-images"), "instance_url": f"s3://{photo_bucket}/photos",
                  "class_prompt": None, "class_dir": None},
            training={"max_steps": 2},
            checkpoint={"every_steps": 2},
            output={"uri": f"file://{root}/a-file/model"},
        )
        path = write_config(root, config)
        failed = launch_trainer(path)
        failed_run = json.loads((root / "model" / "run.json").read_text())
        published_uri = f"gs://{model_bucket}/sks-robot"
        retried = launch_trainer(path, "--set", f"output.uri={published_uri}")
        yield UrlRuns(root, failed, failed_run, retried, gs, published_uri)


def launch_trainer(config_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """As a worker pod runs it: through the launcher, which keeps the trainer's exit code."""
    command = [sys.executable, "-m", "trainer.launch", "--standalone", "--nproc_per_node=1",
               str(REPO / "trainer" / "main.py"), "--config", str(config_path), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_training_reads_photos_from_a_bucket(url_runs):
    assert sorted(path.name for path in list_images(url_runs.root / "instance-images", "k")) == PHOTOS


def test_a_failed_upload_exits_3_and_keeps_the_model_on_the_volume(url_runs):
    root, failed = url_runs.root, url_runs.failed
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert f"error: output.uri = 'file://{root}/a-file/model': upload failed" in failed.stderr
    assert f"the model is kept at {root / 'model'}" in failed.stderr
    assert url_runs.failed_run["final_step"] == 2 and url_runs.failed_run["upload"]["ok"] is False
    assert (root / "model" / "model_index.json").is_file()


def test_the_retry_resumes_from_the_final_checkpoint_and_uploads_to_a_bucket(url_runs):
    retried, gs, uri = url_runs.retried, url_runs.published, url_runs.published_uri
    assert retried.returncode == 0, retried.stderr[-3000:]
    model = url_runs.root / "model"
    run = json.loads((model / "run.json").read_text())
    assert run["resumed_from_step"] == 2 and run["final_step"] == 2
    assert run["upload"] == {"uri": uri, "ok": True}
    # Every file of the exported pipeline, byte for byte; run.json as it was before the
    # upload record was added to the local copy.
    local = sorted(str(path.relative_to(model)) for path in model.rglob("*") if path.is_file())
    prefix = uri.removeprefix("gs://") + "/"
    gs.invalidate_cache()
    assert sorted(name.removeprefix(prefix) for name in gs.find(prefix)) == sorted([*local, COMPLETE_MARKER])
    for name in local:
        if name != "run.json":
            assert gs.cat(prefix + name) == (model / name).read_bytes(), name
    assert json.loads(gs.cat(prefix + "run.json"))["resumed_from_step"] == 2
    assert json.loads(gs.cat(prefix + COMPLETE_MARKER)) == {"files": len(local)}
