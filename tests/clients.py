"""The model families as their clients see them: each with its oracle (the official op
sequence, or the unpatched Hugging Face model) and the fastmae model built from the same
weights, an input sampler and one call that returns ``(loss, pred, mask)``.

Used by the client-loop tests (the official engines' step, Trainer, convergence) and the
autograd-contract tests."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import torch

import fastmae
import fastmae.video
from fastmae import reference
from fastmae.kernels import launch_counts, reset_launch_counts
from fastmae.video import reference as video_reference
from tests.configs import TINY, TINY_CLIP, TINY_VIDEOMAE, TINY_VITMAE
from tests.helpers import assert_close, assert_tensors_match

FAMILIES = ("image", "video", "hf", "videomae")
# The drop-ins built with decoder masking on (decoder_mask_ratio 0.5), as a user opts in.
DECODER_MASKED_FAMILIES = ("image-decoder-masked", "video-decoder-masked")
DECODER_MASKED_SUFFIX = "-decoder-masked"


@dataclass
class Family:
    oracle: torch.nn.Module
    fused: torch.nn.Module
    sample: Callable[[int], torch.Tensor]  # batch size -> a fresh input batch
    call: Callable  # (model, imgs) -> (loss, pred, mask)
    noise_length: int  # L, for a noise argument
    # noise -> the keyword arguments of the model's forward that mask as that noise does
    masking_kwargs: Callable = lambda noise: dict(noise=noise)


def _call_drop_in(model, imgs, noise=None):
    return model(imgs, mask_ratio=0.75, noise=noise)


def _call_hf(model, imgs, noise=None):
    out = model(imgs, noise=noise)
    return out.loss, out.logits, out.mask


def _videomae_masking(noise):
    """HF VideoMAE takes the mask: 75% of the tubelets, ranked by ``noise``, the same count
    in every sample."""
    length = noise.shape[1]
    return dict(bool_masked_pos=noise.argsort(1).argsort(1) < int(length * 0.75))


def _call_videomae(model, clips, noise=None, *, length: int):
    """The mask from ``noise``, drawn here (as the drop-ins draw theirs) when None."""
    if noise is None:
        noise = torch.rand(clips.shape[0], length, device=clips.device)
    masking = _videomae_masking(noise)
    out = model(clips, **masking)
    return out.loss, out.logits, masking["bool_masked_pos"].to(out.logits.dtype)


def make_family(name: str, norm_pix_loss: bool = True) -> Family:
    """The oracle and the fastmae model of family ``name``, with the same initial weights."""
    decoder_masked = name.endswith(DECODER_MASKED_SUFFIX)
    name = name.removesuffix(DECODER_MASKED_SUFFIX)
    options = dict(norm_pix_loss=norm_pix_loss, decoder_mask_ratio=0.5 if decoder_masked else 0)
    if name == "image":
        config = dict(img_size=16, patch_size=4, **options, **TINY)
        torch.manual_seed(0)
        oracle = reference.MaskedAutoencoderViT(**config)
        fused = fastmae.MaskedAutoencoderViT(**config)
        fused.load_state_dict(oracle.state_dict())
        return Family(oracle, fused, lambda n: torch.randn(n, 3, 16, 16), _call_drop_in, 16)
    if name == "video":
        config = dict(cls_embed=True, **options, **TINY, **TINY_CLIP)
        torch.manual_seed(0)
        oracle = video_reference.MaskedAutoencoderViT(**config)
        fused = fastmae.video.MaskedAutoencoderViT(**config)
        fused.load_state_dict(oracle.state_dict())
        return Family(oracle, fused, lambda n: torch.randn(n, 3, 4, 8, 8), _call_drop_in, 8)
    if name == "hf":
        import transformers

        from fastmae.hf import apply_fastmae

        torch.manual_seed(0)
        config = transformers.ViTMAEConfig(
            **TINY_VITMAE, image_size=16, patch_size=4, norm_pix_loss=norm_pix_loss
        )
        oracle = transformers.ViTMAEForPreTraining(config)
        fused = apply_fastmae(copy.deepcopy(oracle))
        return Family(oracle, fused, lambda n: torch.randn(n, 3, 16, 16), _call_hf, 16)
    if name == "videomae":
        import transformers

        from fastmae.hf import apply_fastmae

        torch.manual_seed(0)
        config = transformers.VideoMAEConfig(**TINY_VIDEOMAE, norm_pix_loss=norm_pix_loss)
        oracle = transformers.VideoMAEForPreTraining(config)
        fused = apply_fastmae(copy.deepcopy(oracle))
        call = functools.partial(_call_videomae, length=32)  # 2 x 4 x 4 tubelets
        sample = lambda n: torch.randn(n, 4, 3, 16, 16)  # noqa: E731
        return Family(oracle, fused, sample, call, 32, _videomae_masking)
    raise ValueError(f"unknown family {name!r}")


def trainer_two_steps(model, output_dir, dataset, accumulation: int = 1):
    """Hugging Face's ``Trainer`` loop: two optimiser steps of batch 2 (each of
    ``accumulation`` micro-batches) on ``dataset`` -> (its training loss, the logged losses,
    the parameters after)."""
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=1e-2,
        # SGD, not AdamW: Adam turns the attention key bias's rounding-noise gradient (zero in
        # exact arithmetic) into steps of up to the learning rate, which would compare noise.
        optim="sgd",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        seed=11,
        dataloader_num_workers=0,
    )
    losses = []

    class Record(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.add_callback(Record())
    result = trainer.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return result.training_loss, losses, params


def assert_trainer_matches(fused, oracle, dataset, tmp_path, accumulation: int, backend: str):
    """Two Trainer steps (:func:`trainer_two_steps`) of the patched model and of the unpatched
    one on the same data give the same logged losses and parameters, and the fused loss ran
    its backward once per micro-batch on the Triton backend (Trainer divides the loss for
    gradient accumulation and calls accelerate's backward)."""
    reset_launch_counts()
    fused_loss, fused_losses, fused_params = trainer_two_steps(
        fused, tmp_path / "fused", dataset, accumulation
    )
    counts = launch_counts()
    oracle_run = trainer_two_steps(oracle, tmp_path / "oracle", dataset, accumulation)
    oracle_loss, oracle_losses, oracle_params = oracle_run
    assert len(fused_losses) == len(oracle_losses) == 2
    assert_close(torch.tensor(fused_losses), torch.tensor(oracle_losses))
    assert_close(torch.tensor(fused_loss), torch.tensor(oracle_loss))
    # The key biases start at 0 and SGD moves them by lr x rounding noise: negligible.
    assert_tensors_match(fused_params, oracle_params, "model")
    launches = 2 * accumulation
    assert (counts.get("_masked_loss_bwd_kernel", 0) == launches) == (backend == "triton")


def family_step(family: Family, model, imgs, noise):
    """One forward+backward of ``model`` (the family's oracle or fastmae model) ->
    ``(loss, pred, {name: gradient})``."""
    model.zero_grad()
    loss, pred, _ = family.call(model, imgs, noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred.detach(), grads


def comparable_parameters(model) -> dict:
    """The parameters whose values two implementations must agree on after training: all but
    the attention key biases (a fused qkv bias: its middle third). Softmax ignores a shift
    shared by all keys, so their gradient is zero in exact arithmetic and rounding noise in
    practice, which AdamW turns into steps of up to the learning rate; they never change the
    loss."""
    params = {}
    for name, param in model.named_parameters():
        value = param.detach()
        if name.endswith(("attn.k.bias", "attention.key.bias", "k_proj.bias")):
            continue
        if name.endswith("attn.qkv.bias"):
            third = value.shape[0] // 3
            value = torch.cat([value[:third], value[2 * third :]])
        params[name] = value.clone()
    return params
