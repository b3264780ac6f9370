"""Reading photos as a user has them, and a data order that is a function of the step."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.conftest import INSTANCE_IMAGES
from trainer.config import ConfigError, DataConfig
from trainer.conditioning import tokenize
from trainer.data import DreamBoothData, augment, list_images, load_image_set, load_rgb
from trainer.tiny import byte_level_clip_tokenizer


def exif_rotated_photo(path):
    """A 40x20 image whose left half is red, stored with EXIF orientation 6 (rotate 90
    clockwise to view): upright it is 20 wide, 40 tall, red on top."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes())


def test_exif_orientation_is_applied(tmp_path):
    exif_rotated_photo(tmp_path / "photo.jpg")
    upright = load_rgb(tmp_path / "photo.jpg", "data.instance_dir")
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparency_goes_over_white_and_greyscale_becomes_rgb(tmp_path):
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (16, 16), 77).save(tmp_path / "grey.png")
    Image.new("P", (16, 16), 3).save(tmp_path / "palette.gif")
    assert load_rgb(tmp_path / "clear.png", "k").getpixel((3, 3)) == (255, 255, 255)
    assert load_rgb(tmp_path / "grey.png", "k").getpixel((3, 3)) == (77, 77, 77)
    assert load_rgb(tmp_path / "palette.gif", "k").mode == "RGB"


def test_listing_ignores_hidden_temporaries_and_other_files(tmp_path):
    for name in ["b.png", "a.JPG", ".a.png.tmp-0", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [path.name for path in list_images(tmp_path, "k")] == ["a.JPG", "b.png"]


@pytest.mark.parametrize("setup, message", [
    ("missing", "no such folder"),
    ("file", "not a folder"),
    ("empty", "no images found"),
    ("truncated", "cannot read image"),
])
def test_bad_inputs_name_the_file_or_folder(tmp_path, setup, message):
    target = tmp_path / "photos"
    if setup == "file":
        target.write_text("x")
    elif setup in ("empty", "truncated"):
        target.mkdir()
    if setup == "truncated":
        data = (INSTANCE_IMAGES / "robot-0.png").read_bytes()
        (target / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as caught:
        load_image_set(target, "data.instance_dir", 64)
    assert message in str(caught.value)
    assert "data.instance_dir" in str(caught.value)
    assert ("cut.png" if setup == "truncated" else str(target)) in str(caught.value)


def test_augment_gives_a_square_in_range_and_flip_mirrors():
    image = Image.new("RGB", (80, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 40, 64))  # left half white
    import random

    plain = augment(image, 64, center_crop=True, random_flip=False, rng=random.Random(0)).pixels
    assert plain.shape == (3, 64, 64) and plain.min() >= -1 and plain.max() <= 1
    flipped = None
    for seed in range(20):
        candidate = augment(image, 64, center_crop=True, random_flip=True, rng=random.Random(seed)).pixels
        if not torch.equal(candidate, plain):
            flipped = candidate
            break
    assert flipped is not None and torch.equal(flipped, plain.flip(-1))


def make_data(tmp_path, rank=0, world_size=1, batch_size=1, with_class=True):
    class_dir = tmp_path / "class"
    class_dir.mkdir(exist_ok=True)
    for index, colour in enumerate([(10, 200, 10), (10, 10, 200), (200, 200, 10)]):
        Image.new("RGB", (64, 64), colour).save(class_dir / f"c{index}.png")
    config = DataConfig(
        instance_dir=INSTANCE_IMAGES, instance_prompt="a photo of sks robot",
        class_prompt="a photo of a robot" if with_class else None, class_dir=class_dir if with_class else None,
        num_class_images=3, resolution=64,
    )
    return DreamBoothData(config, [byte_level_clip_tokenizer()], seed=7, rank=rank, world_size=world_size, batch_size=batch_size)


def test_batch_puts_instances_first_then_class_images_with_their_prompts(tmp_path):
    data = make_data(tmp_path, batch_size=2)
    batch = data.batch(0)
    assert batch.num_instance == 2 and batch.pixel_values.shape == (4, 3, 64, 64)
    prompt = tokenize([byte_level_clip_tokenizer()], "a photo of sks robot")
    assert torch.equal(batch.input_ids[0], prompt) and torch.equal(batch.input_ids[1], prompt)
    assert torch.equal(batch.input_ids[2], data.class_ids) and torch.equal(batch.input_ids[3], data.class_ids)
    assert not torch.equal(prompt, data.class_ids)
    # Class images are flat colours: their pixels have (almost) no spread, the robots do.
    assert batch.pixel_values[2].std(dim=(1, 2)).max() < 0.01
    assert batch.pixel_values[0].std(dim=(1, 2)).max() > 0.1


def test_caption_files_give_each_photo_its_own_prompt_in_every_batch(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64), (40 * index, 0, 0)).save(photos / f"dog{index}.png")
    (photos / "dog0.txt").write_text("a photo of sks dog\n  on a   beach\n")  # whitespace folded to single spaces
    (photos / "dog1.txt").write_text("sks dog asleep")  # dog2 has none: the instance prompt
    tokenizers = [byte_level_clip_tokenizer()]
    expected = [tokenize(tokenizers, prompt) for prompt in
                ("a photo of sks dog on a beach", "sks dog asleep", "a photo of sks dog")]

    def data(caption_files: bool) -> DreamBoothData:
        config = DataConfig(instance_dir=photos, instance_prompt="a photo of sks dog", resolution=64,
                            caption_files=caption_files)
        return DreamBoothData(config, tokenizers, seed=7, rank=0, world_size=1, batch_size=1)

    captioned = data(True)
    for micro_step in range(6):  # two epochs: each photo comes with its own prompt
        [(_, index)] = captioned.sample_indices(micro_step)
        assert torch.equal(captioned.batch(micro_step).input_ids[0], expected[index])
    assert all(torch.equal(ids, want) for ids, want in zip(captioned.instance_batch().input_ids, expected))
    # Off (the default), the .txt files are not read: every photo has the instance prompt.
    assert all(torch.equal(ids, expected[2]) for ids in data(False).instance_batch().input_ids)

    (photos / "dog1.txt").write_text("  \n")
    with pytest.raises(ConfigError, match=r"data.instance_dir: caption .*dog1.txt is empty; write the photo's prompt"):
        data(True)
    (photos / "dog1.txt").write_bytes(b"sks \xff dog")
    with pytest.raises(ConfigError, match=r"cannot read caption .*dog1.txt: .*; save it as UTF-8 text or remove it"):
        data(True)


def test_without_prior_preservation_batches_hold_instances_only(tmp_path):
    batch = make_data(tmp_path, with_class=False).batch(3)
    assert batch.pixel_values.shape[0] == batch.num_instance == 1


def test_ranks_see_disjoint_samples_and_every_sample_once_per_epoch(tmp_path):
    ranks = [make_data(tmp_path, rank=rank, world_size=2) for rank in range(2)]
    size = len(ranks[0])
    seen = []
    for micro_step in range(0, (size + 1) // 2):
        for data in ranks:
            seen += data.sample_indices(micro_step)
    first_epoch = [index for epoch, index in seen if epoch == 0]
    assert sorted(first_epoch) == list(range(size))


def test_batches_are_a_pure_function_of_the_step(tmp_path):
    first, again = make_data(tmp_path), make_data(tmp_path)
    for micro_step in (0, 5, 11):
        assert torch.equal(first.batch(micro_step).pixel_values, again.batch(micro_step).pixel_values)
    assert not torch.equal(first.batch(0).pixel_values, first.batch(1).pixel_values)


def test_sdxl_size_ids_hold_the_original_size_and_the_crop_mirrored_by_a_flip(tmp_path):
    import random

    image = Image.new("RGB", (80, 64))  # width 80: a 64 px crop may start 0-16 px from the left
    image.paste((255, 255, 255), (0, 0, 40, 64))  # left half white: a flip shows
    mirrored = 0
    for seed in range(20):
        plain = augment(image, 64, center_crop=False, random_flip=False, rng=random.Random(seed))
        maybe = augment(image, 64, center_crop=False, random_flip=True, rng=random.Random(seed))
        top, left = plain.crop_top_left
        assert top == 0 and 0 <= left <= 16
        if not torch.equal(maybe.pixels, plain.pixels):
            # SDXL's training script flips first, then crops: the same pixels, counted from the mirrored edge.
            assert maybe.crop_top_left == (0, 16 - left)
            mirrored += left != 8
    assert mirrored

    data = make_data(tmp_path, batch_size=2)
    batch = data.batch(0)
    # The robot photos are 96 px squares, resized to 64 and center-cropped; the class images are 64 px.
    robot = [96, 96, 0, 0, 64, 64]
    assert batch.time_ids.tolist() == [robot, robot, [64, 64, 0, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert batch.input_ids.shape == (4, 1, 77)
