import numpy as np
import pytest
import torch

from fairtune.data.base import DatasetInfo, ImageView, Split
from fairtune.data.loader import IMAGENET_MEAN, IMAGENET_STD, BatchSource, crop_flip_side


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


def test_crop_flip_is_utkfaces_resize_and_crop_at_any_size(tmp_path):
    import torch.nn.functional as F

    assert crop_flip_side(176) == 256  # UTKFace's own proportion
    side = crop_flip_side(40)  # 58
    source = BatchSource(split(5, 40, as_memmap=True, tmp_path=tmp_path), info("crop_flip", 40, False), torch.device("cpu"))
    params = {k: v[0] for k, v in source.draw_augmentation(1, 5, torch.Generator().manual_seed(4)).items()}
    images, _, _ = source.gather(torch.arange(5))
    x = source.train_batch(images, params)
    assert x.shape == (5, 3, 40, 40)
    resized = F.interpolate(images.float() / 255, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    for i in range(5):
        top, left = int(params["crop"][i, 0] * (side - 40 + 1)), int(params["crop"][i, 1] * (side - 40 + 1))
        window = resized[i, :, top : top + 40, left : left + 40]
        assert torch.allclose(x[i], window.flip(2) if params["flip"][i] else window, atol=1e-6)
    assert torch.equal(source.eval_batch(images), images.float() / 255)  # stored at the model's side: no resize


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


# ---------------------------------------------------------------- CelebA's RandomResizedCrop


def torchvision_boxes(height: int, width: int, draws: int, seed: int) -> np.ndarray:
    """(draws, 4) (top, left, h, w) from torchvision's own ``RandomResizedCrop.get_params``."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(seed)
    image = torch.empty(3, height, width)
    return np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(draws)])


def fairtune_boxes(height: int, width: int, draws: int, seed: int) -> np.ndarray:
    from fairtune.data.loader import CROP_ATTEMPTS, random_resized_crop_boxes

    gen = torch.Generator().manual_seed(seed)
    area, log_ratio = torch.rand(draws, CROP_ATTEMPTS, generator=gen), torch.rand(draws, CROP_ATTEMPTS, generator=gen)
    boxes = random_resized_crop_boxes(height, width, area, log_ratio, torch.rand(draws, 2, generator=gen))
    return torch.stack(boxes, dim=1).numpy()


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    values = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), values, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


# CelebA's 218x178 (fallback: the whole image, rare) and a narrow 60x12 image, where a quarter of the
# samples exhaust the 10 attempts and take torchvision's centre crop at the clamped ratio (h = 16).
@pytest.mark.parametrize("height, width", [(218, 178), (60, 12)])
def test_random_resized_crop_boxes_follow_torchvision(height, width):
    draws = 20_000
    ours, theirs = fairtune_boxes(height, width, draws, seed=1), torchvision_boxes(height, width, draws, seed=2)
    # KS critical distance at alpha = 0.001 for two samples of n; discrete values only make it stricter
    critical = 1.95 * np.sqrt(2 / draws)

    def describe(boxes: np.ndarray) -> dict[str, np.ndarray]:
        top, left, h, w = boxes.T
        return {
            "area": h * w / (height * width),
            "log_ratio": np.log(w / h),
            "top": np.where(h < height, top / np.maximum(height - h, 1), 0.5),
            "left": np.where(w < width, left / np.maximum(width - w, 1), 0.5),
        }

    for name, values in describe(ours).items():
        assert ks_distance(values, describe(theirs)[name]) < critical, name
    # histograms of scale and ratio, bin by bin within 5 binomial standard errors
    for name, edges in (("area", np.linspace(0.0, 1.0, 11)), ("log_ratio", np.linspace(np.log(3 / 4) - 0.01, 0.3, 11))):
        mine = np.histogram(describe(ours)[name], edges)[0] / draws
        ref = np.histogram(describe(theirs)[name], edges)[0] / draws
        assert np.all(np.abs(mine - ref) <= 5 * np.sqrt(ref * (1 - ref) * 2 / draws) + 1e-3), (name, mine, ref)
    # every box lies inside the image, and the fallback box is torchvision's centre crop
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    fallback = {(218, 178): (0, 0, 218, 178), (60, 12): (22, 0, 16, 12)}[(height, width)]
    rate_ours = np.all(ours == fallback, axis=1).mean()
    rate_theirs = np.all(theirs == fallback, axis=1).mean()
    assert abs(rate_ours - rate_theirs) <= 4 * np.sqrt(max(rate_theirs, 1 / draws) / draws), (rate_ours, rate_theirs)
    if (height, width) == (60, 12):
        assert 0.15 < rate_theirs < 0.35  # the fallback really is exercised
    else:
        assert rate_theirs < 0.005 and rate_ours < 0.005  # not the 20 % of a single draw


def test_random_resized_crop_rarely_shows_the_whole_image_squashed():
    """Through the loader: at CelebA's aspect ratio torchvision almost never falls back to the whole
    image (10 attempts); a single draw with that fallback did so for about a fifth of the samples."""
    n = 400
    images = torch.randint(0, 256, (n, 3, 109, 89), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    source = BatchSource(Split(images, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)),
                         info("random_resized_crop_flip", 24, False), torch.device("cpu"))
    params = {k: v[0] for k, v in source.draw_augmentation(1, n, torch.Generator().manual_seed(5)).items()}
    params["flip"][:] = False
    x = source.train_batch(images, params)
    whole = torch.nn.functional.interpolate(images.float() / 255, size=(24, 24), mode="bilinear", align_corners=False)
    squashed = (x - whole).abs().flatten(1).amax(1) < 1e-5
    assert int(squashed.sum()) <= 4, int(squashed.sum())


def test_random_resized_crop_is_a_resize_of_its_box():
    from fairtune.data.loader import random_resized_crop_boxes

    n, height, width, size = 12, 40, 30, 24
    images = torch.randint(0, 256, (n, 3, height, width), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    source = BatchSource(Split(images, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)),
                         info("random_resized_crop_flip", size, False), torch.device("cpu"))
    params = {k: v[0] for k, v in source.draw_augmentation(1, n, torch.Generator().manual_seed(7)).items()}
    params["flip"][:] = False
    params["area"][:4, 0] = 0.999  # first attempt too wide (area ~1, extreme ratio): the second is used
    params["log_ratio"][:4, 0] = 0.999
    x = source.train_batch(images, params)
    top, left, h, w = random_resized_crop_boxes(height, width, params["area"], params["log_ratio"], params["offset"])
    assert (h < size).any() and (h > size).any()  # both up- and down-sampling boxes
    for i in range(n):
        t, l, bh, bw = int(top[i]), int(left[i]), int(h[i]), int(w[i])
        box = images[i : i + 1, :, t : t + bh, l : l + bw].float() / 255
        expected = torch.nn.functional.interpolate(box, size=(size, size), mode="bilinear", align_corners=False)
        assert torch.allclose(x[i : i + 1], expected, atol=1e-5), i
