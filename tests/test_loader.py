import numpy as np
import torch

from fairtune.data.base import DatasetInfo, ImageView, Split
from fairtune.data.loader import IMAGENET_MEAN, IMAGENET_STD, BatchSource


def info(augment: str, size: int, normalize: bool) -> DatasetInfo:
    return DatasetInfo("t", ("a", "b"), ("g0", "g1"), "cnn", size, augment, normalize)


def split(n: int, side: int, as_memmap: bool = False, tmp_path=None) -> Split:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, side, side), generator=gen, dtype=torch.uint8)
    if as_memmap:
        path = tmp_path / "cache.u8"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=tuple(images.shape))
        array[:] = images.numpy()
        array.flush()
        images = ImageView(np.load(path, mmap_mode="r"), np.arange(n))
    return Split(images, torch.arange(n) % 2, torch.arange(n) // 2 % 2)


def test_flip_augmentation_flips_exactly_the_drawn_samples():
    source = BatchSource(split(16, 32), info("flip", 32, False), torch.device("cpu"))
    params = source.draw_augmentation(1, 16, torch.Generator().manual_seed(1))
    images, labels, groups = source.gather(torch.arange(16))
    x = source.train_batch(images, {k: v[0] for k, v in params.items()})
    flip = params["flip"][0]
    assert 0 < int(flip.sum()) < 16
    expected = images.float() / 255
    expected[flip] = expected[flip].flip(3)
    assert torch.equal(x, expected)
    assert torch.equal(labels, torch.arange(16) % 2)


def test_utkface_crop_is_a_window_of_the_resized_image():
    import torch.nn.functional as F

    source = BatchSource(split(4, 200), info("resize_crop_flip", 176, True), torch.device("cpu"))
    params = source.draw_augmentation(1, 4, torch.Generator().manual_seed(2))
    params = {k: v[0] for k, v in params.items()}
    params["flip"][:] = False
    images, _, _ = source.gather(torch.arange(4))
    x = source.train_batch(images, params)
    assert x.shape == (4, 3, 176, 176)
    resized = F.interpolate(images.float() / 255, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for i in range(4):
        top = int(params["crop"][i, 0] * 81)
        left = int(params["crop"][i, 1] * 81)
        window = (resized[i : i + 1, :, top : top + 176, left : left + 176] - mean) / std
        assert torch.allclose(x[i : i + 1], window, atol=1e-5)


def test_random_resized_crop_shapes_and_whole_image_case(tmp_path):
    source = BatchSource(split(6, 64, as_memmap=True, tmp_path=tmp_path), info("random_resized_crop_flip", 32, False), torch.device("cpu"))
    params = source.draw_augmentation(1, 6, torch.Generator().manual_seed(3))
    params = {k: v[0] for k, v in params.items()}
    images, _, _ = source.gather(torch.tensor([5, 0, 3, 1, 2, 4]))
    assert torch.equal(images[0], torch.from_numpy(np.array(source.images.array[5])))
    x = source.train_batch(images, params)
    assert x.shape == (6, 3, 32, 32)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # area 1 and ratio 1 is the whole image: equals a plain resize (up to the sampling grid)
    params["area"][:] = 1.0
    params["log_ratio"][:] = 0.5
    params["flip"][:] = False
    whole = source.train_batch(images, params)
    plain = torch.nn.functional.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(whole, plain, atol=1e-5)


def test_eval_batch_resizes_and_normalises():
    source = BatchSource(split(2, 200), info("resize_crop_flip", 176, True), torch.device("cpu"))
    images, _, _ = source.gather(torch.arange(2))
    x = source.eval_batch(images)
    assert x.shape == (2, 3, 176, 176)
    assert abs(float(x.mean())) < 0.5  # roughly centred by ImageNet statistics


def test_memmap_gather_follows_the_view_index_and_the_plan_stays_on_the_host(tmp_path):
    full = split(10, 8, as_memmap=True, tmp_path=tmp_path)
    subset = ImageView(full.images, np.array([9, 7, 5, 3, 1]))  # a view of a view, as subsampling makes
    source = BatchSource(Split(subset, torch.arange(5), torch.zeros(5, dtype=torch.long)), info("flip", 8, False), torch.device("cpu"))
    images, labels, _ = source.gather(torch.tensor([4, 0, 2]))
    assert images.dtype == torch.uint8 and images.is_contiguous()
    assert torch.equal(images, torch.from_numpy(np.array(full.images.array[[1, 9, 5]])))
    assert torch.equal(labels, torch.tensor([4, 0, 2]))
    plan = torch.arange(4).view(2, 2)
    assert source.stage_plan(plan).device.type == "cpu"


def test_tensor_split_stages_the_whole_plan_on_its_device():
    source = BatchSource(split(8, 8), info("flip", 8, False), torch.device("cpu"))
    plan = torch.randperm(8).view(2, 4)
    staged = source.stage_plan(plan)
    assert staged.device == source.images.device and torch.equal(staged, plan)
    images, _, _ = source.gather(staged[1])
    assert torch.equal(images, source.images[plan[1]])
