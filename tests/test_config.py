"""fastmae/config.py is the one source of its facts: pyproject, the README and the models
agree with it."""

import re
from pathlib import Path

import fastmae
import fastmae.video
from fastmae import config
from fastmae.kernels import _versions

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lower_bounds_are_the_tested_ranges():
    text = (ROOT / "pyproject.toml").read_text()
    for package, (lowest, _) in (("torch", config.TESTED_TORCH), ("triton", config.TESTED_TRITON)):
        found = re.search(rf'"{package}>=(\d+)\.(\d+)', text)
        assert found and tuple(map(int, found.groups())) == lowest, package


def test_readme_states_the_tested_ranges():
    assert f"Tested with {_versions.tested_ranges()}" in (ROOT / "README.md").read_text()


def test_step_sizes_are_the_models():
    for sizes, model in (
        (config.image_step(), fastmae.mae_vit_base_patch16(depth=0, decoder_depth=0)),
        (config.video_step(), fastmae.video.mae_vit_large_patch16(**config.VIDEO_CLIP, depth=0)),
    ):
        assert sizes.length == model.patch_embed.num_patches
        assert sizes.pixels == model.decoder_pred.out_features
        assert sizes.width == model.patch_embed.proj.out_channels
        assert sizes.decoder_width == model.decoder_embed.out_features
    assert (config.image_step().length, config.image_step().keep) == (196, 49)
    assert (config.video_step().length, config.video_step().keep) == (1568, 156)


def test_factories_are_built_from_the_config():
    for name, sizes in config.IMAGE_FACTORIES.items():
        model = getattr(fastmae, name)(depth=1, decoder_depth=1)
        assert model.patch_embed.patch_size == (sizes["patch_size"],) * 2, name
        assert model.cls_token.shape[-1] == sizes["embed_dim"], name
        assert model.mask_token.shape[-1] == sizes["decoder_embed_dim"], name
    assert list(config.VIDEO_FACTORIES) == [
        "mae_vit_base_patch16",
        "mae_vit_large_patch16",
        "mae_vit_huge_patch14",
    ]
    for name in config.VIDEO_FACTORIES:
        assert callable(getattr(fastmae.video, name)) and callable(
            getattr(fastmae.video.reference, name)
        )
