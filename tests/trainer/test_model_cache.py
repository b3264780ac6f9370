"""The shared model cache: several real processes race for one model; one downloads,
the others wait, nobody reads a partial copy. The "hub" is a local folder served
through fsspec, so the race runs the same lock-and-rename code as a hub download."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.conftest import REPO
from tests.trainer.object_stores import emulated_bucket
from trainer.config import ConfigError, ModelConfig
from trainer.fetch_once import FETCH_RECORD, fetch_once, lock_path, staging_path
from trainer.model_cache import cache_folder, model_folder

# name -> size of the files of the fake pipeline folder
FAKE_MODEL = {"model_index.json": 64, "unet/diffusion_pytorch_model.safetensors": 300_000,
              "vae/diffusion_pytorch_model.safetensors": 200_000, "text_encoder/model.safetensors": 100_000,
              "tokenizer/vocab.json": 1_000, "scheduler/scheduler_config.json": 200}
RACERS = 4


class SlowCountingFileSystem(LocalFileSystem):
    """A local folder as a slow remote: every file copied is logged in a counter file,
    so the test sees how many downloads happened, and takes long enough for a race."""

    protocol = "slowfile"
    counter: str = ""

    def get_file(self, rpath, lpath, **kwargs):
        with open(self.counter, "a") as handle:
            handle.write(f"{os.getpid()} {rpath}\n")
        time.sleep(0.1)
        return super().get_file(rpath, lpath, **kwargs)


def make_fake_model(root: Path) -> Path:
    for name, size in FAKE_MODEL.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * size)
    return root


def complete(folder: Path) -> bool:
    return all((folder / name).is_file() and (folder / name).stat().st_size == size
               for name, size in FAKE_MODEL.items())


def racer(source: str, cache_dir: str, counter: str, start, results) -> None:
    SlowCountingFileSystem.counter = counter
    fsspec.register_implementation("slowfile", SlowCountingFileSystem, clobber=True)
    start.wait()
    folder = model_folder(ModelConfig(source=source, cache_dir=Path(cache_dir)))
    results.put((os.getpid(), str(folder), complete(folder)))


@pytest.fixture(scope="module")
def race(tmp_path_factory):
    """Four processes ask for one model at once, while this one watches the cache."""
    root = tmp_path_factory.mktemp("race")
    source = "slowfile://" + str(make_fake_model(root / "hub" / "org" / "tiny-sd"))
    cache, counter = root / "cache", root / "downloads.log"
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=racer, args=(source, str(cache), str(counter), start, results))
                 for _ in range(RACERS)]
    for process in processes:
        process.start()
    time.sleep(1.0)  # every racer is imported and waiting
    target = cache_folder(cache, source, None)
    start.set()
    partial_sightings = 0
    while any(process.is_alive() for process in processes):
        if target.exists() and not complete(target):
            partial_sightings += 1
        time.sleep(0.01)
    for process in processes:
        process.join()
    return {"target": target, "results": [results.get(timeout=5) for _ in processes],
            "downloads": counter.read_text().splitlines(), "partial_sightings": partial_sightings,
            "exit_codes": [process.exitcode for process in processes]}


def test_racing_processes_download_once(race):
    assert race["exit_codes"] == [0] * RACERS
    downloaders = {line.split()[0] for line in race["downloads"]}
    assert len(downloaders) == 1
    assert len(race["downloads"]) == len(FAKE_MODEL)
    record = json.loads((race["target"] / FETCH_RECORD).read_text())
    assert record["by"].split("-")[-2] in downloaders


def test_every_racer_gets_the_complete_folder_and_none_sees_a_partial_one(race):
    assert {(folder, ok) for _, folder, ok in race["results"]} == {(str(race["target"]), True)}
    assert race["partial_sightings"] == 0
    leftovers = [path.name for path in race["target"].parent.iterdir() if path != race["target"]]
    assert leftovers == []  # no lock, no staging folder


def test_cache_folder_layout_is_id_at_revision(tmp_path):
    assert cache_folder(tmp_path, "org/model", None) == tmp_path / "org--model@main"
    assert cache_folder(tmp_path, "org/model", "abc123") == tmp_path / "org--model@abc123"
    assert cache_folder(tmp_path, "s3://bucket/models/sd", None) == tmp_path / "bucket--models--sd@main"
    # a revision is a name, not a path: it stays one folder inside the cache
    assert cache_folder(tmp_path, "org/model", "../../etc").parent == tmp_path


def test_a_local_folder_stays_a_local_folder(tmp_path):
    folder = make_fake_model(tmp_path / "model")
    assert model_folder(ModelConfig(source=str(folder), cache_dir=tmp_path / "cache")) == folder
    assert not (tmp_path / "cache").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    target = tmp_path / "model@main"
    lock_path(target).write_text("deadnode-1-abcdef")
    staging_path(target, "deadnode-1-abcdef").mkdir()  # its half download
    fetched = fetch_once(target, lambda folder: (folder / "weights").write_text("w"), what="m",
                         poll_seconds=0.05, stale_seconds=0.3)
    assert fetched and (target / "weights").read_text() == "w"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model@main"]


def test_a_failed_fetch_releases_the_lock_and_leaves_nothing(tmp_path):
    target = tmp_path / "model@main"

    def broken(folder: Path) -> None:
        (folder / "half").write_text("h")
        raise ConfigError("model.source = 'm': download failed: boom")

    with pytest.raises(ConfigError, match="boom"):
        fetch_once(target, broken, what="m")
    assert list(tmp_path.iterdir()) == []


def test_a_model_in_a_bucket_is_copied_whole_into_the_cache(tmp_path, monkeypatch):
    """The recursive copy through a real S3 backend (moto's server): every file of the
    pipeline's subfolders, under <cache>/<bucket--path>@main."""
    folder = make_fake_model(tmp_path / "model")
    with emulated_bucket("s3", monkeypatch) as (s3, bucket):
        s3.put(f"{folder}/", f"{bucket}/models/sd/", recursive=True)
        url = f"s3://{bucket}/models/sd"
        cached = model_folder(ModelConfig(source=url, cache_dir=tmp_path / "cache"))
    assert cached == cache_folder(tmp_path / "cache", url, None)
    for name, size in FAKE_MODEL.items():
        assert (cached / name).read_bytes() == b"x" * size, name
    assert json.loads((cached / FETCH_RECORD).read_text())["source"] == f"{url}@main"


def test_an_unreachable_model_url_names_key_and_url(tmp_path):
    missing = f"file://{tmp_path}/no-such-model"
    with pytest.raises(ConfigError, match=r"model\.source = .*no-such-model") as error:
        model_folder(ModelConfig(source=missing, cache_dir=tmp_path / "cache"))
    assert "FileNotFoundError" in str(error.value) or "empty or missing" in str(error.value)
    assert not cache_folder(tmp_path / "cache", missing, None).exists()


def test_offline_hub_download_fails_the_run_with_id_revision_and_cause(tmp_path):
    """The real entry point, offline: exit 2 before any process group, one clear line."""
    config = {
        "model": {"source": "example-org/no-such-model", "revision": "v1", "cache_dir": str(tmp_path / "models")},
        "data": {"instance_dir": str(REPO / "examples" / "instance-images"), "instance_prompt": "a photo of sks robot"},
        "checkpoint": {"dir": str(tmp_path / "checkpoints")},
        "output": {"dir": str(tmp_path / "model")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "model.source = 'example-org/no-such-model' (revision v1)" in result.stderr
    assert "offline" in result.stderr
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "models").iterdir()) == []  # no lock, no half copy


# A part of the file listings of the SD 1.5 and SDXL base repos on the hub.
SD15_REPO = ["model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", "safety_checker/model.safetensors",
             "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
             "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/config.json", "text_encoder/pytorch_model.bin", "text_encoder/model.safetensors",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
             "scheduler/scheduler_config.json"]
SDXL_REPO = ["model_index.json", "sd_xl_base_1.0.safetensors", "vae_decoder/model.onnx",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_flax_model.msgpack",
             "unet/model.onnx_data", "unet/openvino_model.bin", "unet/openvino_model.xml",
             "unet/diffusion_pytorch_model.fp16.safetensors",
             "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "text_encoder_2/openvino_model.bin",
             "tokenizer_2/vocab.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


def test_hub_downloads_take_one_copy_of_each_part_in_safetensors_and_bin_only_where_it_is_the_only_one():
    from trainer.model_cache import select_hub_files

    assert select_hub_files(SD15_REPO) == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"]
    assert select_hub_files(SDXL_REPO) == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors", "tokenizer_2/vocab.json", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors"]
    # An older repo with pickled weights only: those are what there is.
    old = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin"]
    assert select_hub_files(old) == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"]
