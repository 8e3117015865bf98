import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omx.encoders import Encoder, HandcraftedEncoder, get_encoder, resize_patches

PURPLE = (80, 50, 140)  # hematoxylin-stained nucleus
PINK = (230, 150, 200)  # eosin-stained stroma
WHITE = (245, 245, 245)


def _solid(color, n=1, px=96):
    return np.broadcast_to(np.array(color, dtype=np.uint8), (n, px, px, 3)).copy()


def _nuclei_patch(rng, n_nuclei=20, px=96):
    """Pink stroma with round purple nuclei of radius ~4 px."""
    patch = _solid(PINK, px=px)[0]
    yy, xx = np.mgrid[:px, :px]
    for cy, cx in rng.uniform(6, px - 6, size=(n_nuclei, 2)):
        patch[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = PURPLE
    return patch


@pytest.fixture(scope="module")
def patches():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(10, 96, 96, 3), dtype=np.uint8)


def test_handcrafted_shape_finite_deterministic(patches):
    enc = HandcraftedEncoder()
    feats = enc.transform(patches)
    assert isinstance(enc, Encoder)
    assert feats.shape == (10, enc.dim)
    assert feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert len(enc.feature_names_) == enc.dim == len(set(enc.feature_names_))
    np.testing.assert_array_equal(feats, enc.transform(patches))
    # threads do not change the result; batch size only up to float rounding
    np.testing.assert_array_equal(
        HandcraftedEncoder(batch_size=3, n_jobs=1).transform(patches),
        HandcraftedEncoder(batch_size=3).transform(patches),
    )
    np.testing.assert_allclose(feats[3], enc.transform(patches[3:4])[0], rtol=1e-4, atol=1e-5)


def test_handcrafted_blank_and_empty():
    enc = HandcraftedEncoder()
    feats = enc.transform(np.concatenate([_solid(WHITE), _solid((0, 0, 0)), _solid((255, 255, 255))]))
    assert np.isfinite(feats).all()
    assert enc.transform(np.zeros((0, 96, 96, 3), np.uint8)).shape == (0, enc.dim)


def test_handcrafted_reacts_to_hematoxylin():
    enc = HandcraftedEncoder()
    rng = np.random.default_rng(1)
    batch = np.stack([_nuclei_patch(rng), _solid(PINK)[0], _solid(WHITE)[0], _solid(PURPLE)[0]])
    f = dict(zip(enc.feature_names_, enc.transform(batch).T, strict=True))
    nuclei, eosin, white, purple = 0, 1, 2, 3
    assert f["nuclear_fraction"][nuclei] > 0.05
    assert f["nuclear_fraction"][eosin] == 0
    assert f["blob_density"][nuclei] > f["blob_density"][eosin] == 0
    assert f["h_mean"][purple] > f["h_mean"][nuclei] > f["h_mean"][eosin]
    assert f["e_mean"][eosin] > f["e_mean"][white]
    assert f["tissue_fraction"][white] == 0
    assert f["tissue_fraction"][eosin] == 1
    assert f["dog1_energy"][nuclei] > f["dog1_energy"][eosin]


def test_handcrafted_centre_features_see_the_centre():
    enc = HandcraftedEncoder()
    patch = _solid(PINK)
    patch[0, 24:72, 24:72] = PURPLE  # exactly the inner half
    f = dict(zip(enc.feature_names_, enc.transform(patch)[0], strict=True))
    assert f["centre_nuclear_fraction"] == 1.0
    assert f["nuclear_fraction"] == pytest.approx(0.25)


def test_resize_and_patch_checks(patches):
    enc = HandcraftedEncoder()
    big = np.repeat(np.repeat(patches, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(resize_patches(big, 96), patches)
    np.testing.assert_allclose(enc.transform(big), enc.transform(patches), rtol=1e-5, atol=1e-5)
    odd = resize_patches(patches[:2], 50)
    assert odd.shape == (2, 50, 50, 3) and odd.dtype == np.uint8
    assert enc.transform(odd).shape == (2, enc.dim)
    with pytest.raises(ValueError, match="uint8"):
        enc.transform(patches / 255.0)
    with pytest.raises(ValueError, match="shape"):
        enc.transform(patches.transpose(0, 3, 1, 2))


def test_cooccurrence_known_answer():
    from omx.encoders._handcrafted import _cooccurrence

    # grey levels 0-3 of 8; the centre of each optical-density bin (1.5 / 8 wide) quantises back to its level
    levels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 2, 2, 2], [2, 2, 3, 3]])
    f = _cooccurrence(((levels + 0.5) * 1.5 / 8)[None])
    # distance 1, horizontal and vertical pairs pooled (24 pairs), symmetric: counted by hand
    counts = np.zeros((8, 8))
    counts[[0, 1, 2, 3], [0, 1, 2, 3]] = [10, 8, 8, 2]
    for (i, j), n in {(0, 1): 2, (1, 2): 2, (2, 3): 3, (0, 2): 3}.items():
        counts[i, j] = counts[j, i] = n
    assert counts.sum() == 48
    p = counts[counts > 0] / 48
    assert f["glcm1_contrast"][0] == pytest.approx(19 / 24)
    assert f["glcm1_homogeneity"][0] == pytest.approx((14 + 7 / 2 + 3 / 5) / 24)
    assert f["glcm1_energy"][0] == pytest.approx(np.sqrt(284) / 48)
    assert f["glcm1_entropy"][0] == pytest.approx(-(p * np.log(p)).sum())
    assert f["glcm1_correlation"][0] == pytest.approx(1415 / 2327)
    # a flat image has no spread: correlation 1 by convention, no co-occurrence contrast
    flat = _cooccurrence(np.full((2, 6, 6), 0.5))
    np.testing.assert_array_equal(flat["glcm2_correlation"], [1.0, 1.0])
    np.testing.assert_array_equal(flat["glcm2_contrast"], [0.0, 0.0])


def test_stain_matrix_is_ruifrok_johnston():
    from omx.encoders._handcrafted import HED_FROM_RGB

    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    np.testing.assert_allclose(HED_FROM_RGB @ rgb_from_hed, np.eye(3), atol=1e-6)


def test_resize_block_mean_known_answer():
    block = np.zeros((1, 4, 4, 3), np.uint8)
    block[0, :2, :2, 0] = [[0, 1], [2, 3]]  # mean 1.5: rounds half up to 2
    block[0, :2, 2:, 0] = [[0, 0], [0, 1]]  # mean 0.25: 0
    block[0, 2:, :2, 0] = [[255, 255], [255, 254]]  # mean 254.75: 255
    block[0, 2:, 2:, 0] = [[10, 11], [12, 13]]  # mean 11.5: 12
    np.testing.assert_array_equal(resize_patches(block, 2)[0, :, :, 0], [[2, 0], [255, 12]])


def test_import_does_not_load_torch():
    import omx

    src = str(Path(omx.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys, omx.encoders, omx.models; omx.encoders.get_encoder('handcrafted'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False"


def test_get_encoder():
    enc = get_encoder("handcrafted")
    assert isinstance(enc, HandcraftedEncoder)
    assert get_encoder(enc) is enc
    rebuilt = get_encoder(HandcraftedEncoder(64, hematoxylin_threshold=0.8).get_params())
    assert rebuilt.patch_px == 64 and rebuilt.hematoxylin_threshold == 0.8
    with pytest.raises(ValueError, match="Unknown encoder"):
        get_encoder("resnet")
    with pytest.raises(TypeError):
        get_encoder(3)


def test_torch_encoder_tiny_module(patches):
    torch = pytest.importorskip("torch")
    from omx.encoders import SmallCNN, TorchEncoder

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))  # (b, 8, 1, 1)
    enc = get_encoder(module, patch_px=32, batch_size=4, device="cpu")
    assert isinstance(enc, TorchEncoder)
    assert enc.dim == 8
    feats = enc.transform(patches)  # 96 px patches resized to 32 px on the fly
    assert feats.shape == (10, 8) and feats.dtype == np.float32 and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, enc.transform(patches))
    same = TorchEncoder(module, patch_px=32, batch_size=64, device="cpu").transform(patches)
    np.testing.assert_allclose(feats, same, rtol=1e-5, atol=1e-6)
    assert not module.training
    assert enc.get_params()["module"] == "Sequential"
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        get_encoder(enc.get_params())
    # a brighter image gives other features: the module sees the input
    assert not np.allclose(enc.transform(_solid(WHITE)), enc.transform(_solid(PURPLE)))

    cnn = SmallCNN(out_dim=5, width=8)
    assert cnn(torch.zeros(2, 3, 40, 40)).shape == (2, 5)
    assert SmallCNN(width=8).dim == 32
    assert TorchEncoder(SmallCNN(width=8), patch_px=32, device="cpu").transform(patches[:3]).shape == (3, 32)
