"""The installed wheel as a user meets it: run from outside the checkout, one fused training
step of every family (image, video, HF ViTMAE, HF VideoMAE) on both backends (the Triton
kernels in the interpreter, and the torch path), against the plain model or the unpatched
Hugging Face model. Exits non-zero on any difference."""

import copy
import functools
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402  (imports Hugging Face's top-level `kernels`)

import fastmae  # noqa: E402
import fastmae.hf  # noqa: E402
import fastmae.hf.reference  # noqa: E402
import fastmae.video  # noqa: E402
from fastmae import reference  # noqa: E402
from fastmae.kernels import launch_counts, reset_launch_counts  # noqa: E402
from fastmae.video import reference as video_reference  # noqa: E402

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
SMALL = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
             decoder_num_heads=2)  # fmt: skip
HF_SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                decoder_intermediate_size=32)  # fmt: skip


def installed_not_checkout():
    for module in (fastmae, fastmae.hf, fastmae.kernels):
        path = pathlib.Path(module.__file__).resolve()
        assert CHECKOUT not in path.parents, f"{module.__name__} comes from the checkout: {path}"
    spec = importlib.util.find_spec("kernels")
    origin = pathlib.Path(spec.origin).resolve()
    assert CHECKOUT not in origin.parents, f"`kernels` resolves into the checkout: {origin}"
    print(f"fastmae {fastmae.__version__} from {pathlib.Path(fastmae.__file__).parent}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, kernels {origin}")


def drop_in(fused_class, oracle_class, config, shape, **options):
    torch.manual_seed(0)
    oracle = oracle_class(**config)
    fused = fused_class(**config)
    fused.load_state_dict(oracle.state_dict())
    imgs = torch.randn(shape)

    def call(model):
        torch.manual_seed(1)
        return model(imgs, **options)[0]

    return fused, oracle, call


def hf(config, model_class, inputs, decoder_mask_ratio=0.0, oracle_forward=None):
    """With ``oracle_forward`` (one of fastmae.hf.reference's), the unpatched model runs it."""
    torch.manual_seed(0)
    oracle = model_class(config)
    fused = fastmae.hf.apply_fastmae(copy.deepcopy(oracle), decoder_mask_ratio)
    if oracle_forward is not None:
        oracle.forward = functools.partial(oracle_forward, oracle)

    def call(model):
        torch.manual_seed(1)
        return model(**inputs).loss

    return fused, oracle, call


def families():
    video = dict(img_size=8, patch_size=4, num_frames=4, t_patch_size=2, pred_t_dim=2)
    clip = torch.randn(2, 4, 3, 16, 16)
    masked = torch.zeros(2, 32, dtype=torch.bool)
    masked[:, :24] = True
    decoded = masked.clone()
    decoded[:, 12:] = False
    vitmae = transformers.ViTMAEConfig(image_size=16, patch_size=4, norm_pix_loss=True, **HF_SMALL)
    videomae = transformers.VideoMAEConfig(
        image_size=16, patch_size=4, num_frames=4, tubelet_size=2, norm_pix_loss=True, **HF_SMALL
    )
    return {
        "image": drop_in(
            fastmae.MaskedAutoencoderViT,
            reference.MaskedAutoencoderViT,
            dict(img_size=16, patch_size=4, norm_pix_loss=True, **SMALL),
            (2, 3, 16, 16),
        ),
        "image, decoder masking 0.5": drop_in(
            fastmae.MaskedAutoencoderViT,
            reference.MaskedAutoencoderViT,
            dict(img_size=16, patch_size=4, decoder_mask_ratio=0.5, **SMALL),
            (2, 3, 16, 16),
        ),
        "video": drop_in(
            fastmae.video.MaskedAutoencoderViT,
            video_reference.MaskedAutoencoderViT,
            dict(cls_embed=True, norm_pix_loss=True, **video, **SMALL),
            (2, 3, 4, 8, 8),
            mask_ratio=0.5,
        ),
        "HF ViTMAE": hf(
            vitmae, transformers.ViTMAEForPreTraining, dict(pixel_values=torch.randn(2, 3, 16, 16))
        ),
        "HF ViTMAE, decoder masking 0.5": hf(
            vitmae,
            transformers.ViTMAEForPreTraining,
            dict(pixel_values=torch.randn(2, 3, 16, 16)),
            decoder_mask_ratio=0.5,
            oracle_forward=functools.partial(
                fastmae.hf.reference.vitmae_pretraining, decoder_mask_ratio=0.5
            ),
        ),
        "HF VideoMAE": hf(
            videomae,
            transformers.VideoMAEForPreTraining,
            dict(pixel_values=clip, bool_masked_pos=masked),
        ),
        "HF VideoMAE, decoder_mask": hf(
            videomae,
            transformers.VideoMAEForPreTraining,
            dict(pixel_values=clip, bool_masked_pos=masked, decoder_mask=decoded),
            oracle_forward=fastmae.hf.reference.videomae_pretraining,
        ),
    }  # fmt: skip


def data_loader_ok() -> bool:
    """fastmae.data from the wheel: two JPEGs written here, one batch through the loader (two
    workers), against the oracle on Pillow's decode with the same draws."""
    import io
    import tempfile

    from PIL import Image

    import fastmae.data
    import fastmae.data.reference

    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        for name, size in (("a", (40, 30)), ("b", (24, 52))):
            os.makedirs(os.path.join(root, name))
            pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(os.path.join(root, name, "x.JPEG"), quality=90)
        dataset = fastmae.data.ImageFolder(root)
        loader = fastmae.data.DataLoader(dataset, batch_size=2, num_workers=2, input_size=16)
        samples, targets = next(iter(loader))
        ok = targets.tolist() == [0, 1]
        for index, row in enumerate(samples):
            with Image.open(io.BytesIO(dataset[index][0].numpy().tobytes())) as image:
                image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
            box, flip = fastmae.data.draw(*image.shape[1:], 0, 0, index, loader.augmentation)
            expected = fastmae.data.reference.augment_image(image, box, flip, loader.augmentation)
            ok = ok and torch.equal(row, expected)
    print(f"{'ok  ' if ok else 'FAIL'} fastmae.data: a batch of 2 JPEGs equals the oracle's")
    return ok


def main():
    installed_not_checkout()
    failures = [] if data_loader_ok() else ["fastmae.data"]
    for name, (fused, oracle, call) in families().items():
        expected = call(oracle)
        expected.backward()
        for backend in ("triton", "torch"):
            fused.zero_grad()
            reset_launch_counts()
            with fastmae.use_backend(backend):
                loss = call(fused)
                loss.backward()
            launched = sum(launch_counts().values())
            pairs = [(a.grad, b.grad) for a, b in zip(fused.parameters(), oracle.parameters())]
            got, want = (
                torch.cat([p[i].flatten() for p in pairs if p[1] is not None]) for i in (0, 1)
            )
            gap = ((got - want).norm() / want.norm()).item()  # over all gradients together
            ok = (
                abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
                and gap <= 1e-5
                and (launched > 0) == (backend == "triton")
            )
            print(f"{'ok  ' if ok else 'FAIL'} {name:32s} {backend:6s} loss {loss.item():.6f} "
                  f"(reference {expected.item():.6f}), gradients' relative error {gap:.1e}, "
                  f"{launched} kernel launches")  # fmt: skip
            if not ok:
                failures.append(f"{name} ({backend})")
    if failures:
        sys.exit(f"smoke failed: {', '.join(failures)}")
    print("smoke: every family ran its fused step from the installed wheel")


if __name__ == "__main__":
    main()
