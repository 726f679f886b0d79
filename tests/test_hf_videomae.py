"""fastmae.hf on transformers' VideoMAE: the fused ops inside VideoMAEForPreTraining and
VideoMAEModel give the unpatched model's loss, logits and gradients on both backends, in HF's
own loops; what the fused path does not take falls back to HF's code."""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastmae  # noqa: E402
import fastmae.hf  # noqa: E402
from fastmae.kernels import launch_counts, reset_launch_counts  # noqa: E402
from tests.clients import assert_trainer_matches  # noqa: E402
from tests.configs import TINY_VIDEOMAE  # noqa: E402
from tests.helpers import assert_as_accurate, assert_close, assert_tensors_match  # noqa: E402

# Every kernel of a fused VideoMAE training step (the add-positions kernel runs inside the
# encoder input).
STEP_KERNELS = {
    "_copy_patches_kernel",
    "_add_positions_kernel",
    "_unshuffle_fwd_kernel",
    "_unshuffle_bwd_kernel",
    "_masked_loss_fwd_kernel",
    "_masked_loss_bwd_kernel",
}


def config(**overrides):
    return transformers.VideoMAEConfig(**{**TINY_VIDEOMAE, **overrides})


def twins(cls=transformers.VideoMAEForPreTraining, **overrides):
    """An HF model and a patched deep copy of it (same weights)."""
    hf = cls(config(**overrides))
    fused = fastmae.hf.apply_fastmae(copy.deepcopy(hf))
    return hf, fused


def num_tubelets(model_config):
    grid = model_config.image_size // model_config.patch_size
    return model_config.num_frames // model_config.tubelet_size * grid * grid


def clip_and_mask(model_config, batch=3, ratio=0.75, tube=False):
    """A clip ``[N, T, C, H, W]`` and a mask with the same count in every sample: random
    tubelets, or with ``tube`` the same spatial patches in every frame (VideoMAE's tube
    masking)."""
    size = model_config.image_size
    pixel_values = torch.randn(
        batch, model_config.num_frames, model_config.num_channels, size, size
    )
    length = num_tubelets(model_config)
    spatial = (size // model_config.patch_size) ** 2
    drawn = spatial if tube else length
    masked = int(drawn * ratio)
    ranks = torch.rand(batch, drawn).argsort(1).argsort(1)
    mask = ranks < masked
    if tube:
        mask = mask.repeat(1, length // spatial)
    return pixel_values, mask


def run(model, pixel_values, bool_masked_pos, **kwargs):
    model.zero_grad()
    out = model(pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(fused_out, hf_out, fused_grads, hf_grads):
    assert_close(fused_out.loss, hf_out.loss, "model", "loss")
    assert_close(fused_out.logits, hf_out.logits, "model", "logits")
    assert "videomae.embeddings.patch_embeddings.projection.weight" in hf_grads
    assert_tensors_match(fused_grads, hf_grads)


@pytest.mark.parametrize(
    "norm_pix,tubelet,channels",
    [(False, 2, 3), (True, 2, 3), (False, 1, 3), (True, 1, 3), (True, 2, 1), (True, 1, 1)],
    ids=lambda v: str(v),
)
def test_apply_matches_unpatched(backend, norm_pix, tubelet, channels):
    hf, fused = twins(norm_pix_loss=norm_pix, tubelet_size=tubelet, num_channels=channels)
    pixel_values, mask = clip_and_mask(hf.config)
    reset_launch_counts()
    fused_out, fused_grads = run(fused, pixel_values, mask)
    counts = launch_counts()
    hf_out, hf_grads = run(hf, pixel_values, mask)
    assert_same(fused_out, hf_out, fused_grads, hf_grads)
    if backend == "triton":  # every fused kernel of the step ran, the loss once each way
        assert STEP_KERNELS <= set(counts)
        assert counts["_masked_loss_fwd_kernel"] == counts["_masked_loss_bwd_kernel"] == 1
    else:
        assert counts == {}


@pytest.mark.parametrize("image_size", [16, 24])
@pytest.mark.parametrize("mean_pooling", [True, False], ids=["mean-pooling", "layernorm"])
def test_image_sizes_and_pooling(backend, image_size, mean_pooling):
    hf, fused = twins(image_size=image_size, use_mean_pooling=mean_pooling, norm_pix_loss=True)
    assert (hf.videomae.layernorm is None) == mean_pooling
    pixel_values, mask = clip_and_mask(hf.config, batch=2, ratio=0.9, tube=True)
    fused_out, fused_grads = run(fused, pixel_values, mask)
    hf_out, hf_grads = run(hf, pixel_values, mask)
    assert_same(fused_out, hf_out, fused_grads, hf_grads)


def test_hidden_states_attentions_and_tuples_are_hf_own(backend):
    hf, fused = twins(attn_implementation="eager")
    pixel_values, mask = clip_and_mask(hf.config, batch=2)
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    got, expected = fused(pixel_values, mask, **kwargs), hf(pixel_values, mask, **kwargs)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    assert len(got.attentions) == len(expected.attentions) == 2
    for a, b in zip(
        got.hidden_states + got.attentions, expected.hidden_states + expected.attentions
    ):
        assert_close(a, b)
    got, expected = (m(pixel_values, mask, return_dict=False) for m in (fused, hf))
    assert isinstance(got, tuple) and len(got) == len(expected) == 2  # (loss, logits)
    for a, b in zip(got, expected):
        assert_close(a, b)


def test_gradient_checkpointing_is_hf_own(backend):
    hf, fused = twins(norm_pix_loss=True)
    for model in (hf, fused):
        model.gradient_checkpointing_enable()
        model.train()
    pixel_values, mask = clip_and_mask(hf.config, batch=2)
    fused_out, fused_grads = run(fused, pixel_values, mask)
    hf_out, hf_grads = run(hf, pixel_values, mask)
    assert_same(fused_out, hf_out, fused_grads, hf_grads)


def test_encoder_model_alone(backend):
    hf, fused = twins(transformers.VideoMAEModel)
    pixel_values, mask = clip_and_mask(hf.config)
    pixel_values.requires_grad_()
    reset_launch_counts()
    got = fused(pixel_values, bool_masked_pos=mask).last_hidden_state
    counts = launch_counts()
    expected = hf(pixel_values, bool_masked_pos=mask).last_hidden_state
    assert got.shape == expected.shape == (3, num_tubelets(hf.config) // 4, 32)
    assert_close(got, expected)
    # The clip's own gradient, through the embedding read in place from [N, T, C, H, W].
    (grad_got,) = torch.autograd.grad(got.square().sum(), pixel_values)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), pixel_values)
    assert_close(grad_got, grad_expected, "gradient")
    assert ("_copy_patches_kernel" in counts) == (backend == "triton")
    # Without a mask every tubelet is embedded: HF's own code.
    reset_launch_counts()
    got = fused(pixel_values).last_hidden_state
    assert launch_counts() == {}
    assert torch.equal(got, hf(pixel_values).last_hidden_state)


def test_unequal_mask_counts_raise_clearly(any_backend):
    _, fused = twins()
    pixel_values, mask = clip_and_mask(fused.config, batch=2)
    mask[0, ~mask[0]] = True  # sample 0 masks every tubelet, sample 1 three quarters
    length = num_tubelets(fused.config)
    with pytest.raises(ValueError, match=f"same number .* between {length * 3 // 4} and {length}"):
        fused(pixel_values, bool_masked_pos=mask)


def test_calls_the_fused_path_does_not_take_get_hf_behaviour(any_backend):
    hf, fused = twins()
    pixel_values, mask = clip_and_mask(hf.config, batch=2)
    reset_launch_counts()
    for model in (hf, fused):  # no mask: HF's error
        with pytest.raises(ValueError, match="boolean mask"):
            model(pixel_values, bool_masked_pos=None)
    for model in (hf, fused):  # more frames than the config's: HF's error
        with pytest.raises(RuntimeError):
            model(torch.cat([pixel_values, pixel_values], 1), bool_masked_pos=mask)
    assert launch_counts() == {}
    hf_gray, fused_gray = twins(num_channels=1, norm_pix_loss=False)
    gray, _ = clip_and_mask(hf_gray.config, batch=2)
    for model in (hf_gray, fused_gray):  # HF refuses to make labels of 1 channel without
        with pytest.raises(ValueError, match="non-RGB"):  # norm_pix_loss (after its encoder)
            model(gray, bool_masked_pos=mask)
    for model in (hf, fused):  # a clip in another dtype than the model's: HF's error
        with pytest.raises(RuntimeError):
            model(pixel_values.double(), bool_masked_pos=mask)


@pytest.mark.parametrize("masked", ["none", "all"])
def test_masks_of_nothing_or_everything_get_hf_behaviour(any_backend, masked):
    """No masked tubelet (HF's decoder then returns every token) or no visible one: HF's own
    code for both models, so HF's error (transformers 5.x) or HF's result, NaN included
    (4.x), bit for bit."""
    hf, fused = twins()
    pixel_values, _ = clip_and_mask(hf.config, batch=2)
    mask = torch.full((2, num_tubelets(hf.config)), masked == "all")
    results = []
    for model in (hf, fused):
        try:
            out = model(pixel_values, bool_masked_pos=mask)
            results.append((out.loss, out.logits))
        except (ValueError, RuntimeError) as error:
            results.append((type(error), str(error)))
    if isinstance(results[0][0], torch.Tensor):
        for got, expected in zip(results[1], results[0]):
            assert torch.allclose(got, expected, rtol=0, atol=0, equal_nan=True)
    else:
        assert results[0] == results[1]


def test_patch_and_unpatch_the_classes(backend, tmp_path):
    hf_videomae = fastmae.hf.videomae.hf_videomae
    original = hf_videomae.VideoMAEEmbeddings.forward
    transformers.VideoMAEForPreTraining(config(norm_pix_loss=True)).save_pretrained(tmp_path)
    fastmae.hf.patch("videomae")
    try:
        assert hf_videomae.VideoMAEEmbeddings.forward is not original
        loaded = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path)
        pixel_values, mask = clip_and_mask(loaded.config, batch=2)
        reset_launch_counts()
        got, got_grads = run(loaded, pixel_values, mask)
        assert ("_unshuffle_fwd_kernel" in launch_counts()) == (backend == "triton")
    finally:
        fastmae.hf.unpatch("videomae")
    assert hf_videomae.VideoMAEEmbeddings.forward is original
    unpatched = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path)
    expected, expected_grads = run(unpatched, pixel_values, mask)
    assert_same(got, expected, got_grads, expected_grads)


def test_save_pretrained_of_a_patched_model_loads_anywhere(backend, tmp_path):
    hf, fused = twins(norm_pix_loss=True)
    fused.save_pretrained(tmp_path)
    assert set(fused.state_dict()) == set(hf.state_dict())
    plain = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path)
    repatched = fastmae.hf.apply_fastmae(
        transformers.VideoMAEForPreTraining.from_pretrained(tmp_path)
    )
    pixel_values, mask = clip_and_mask(hf.config, batch=2)
    got, got_grads = run(repatched, pixel_values, mask)
    expected, expected_grads = run(plain, pixel_values, mask)
    assert_same(got, expected, got_grads, expected_grads)


def test_compile_matches_eager(backend):
    _, fused = twins(norm_pix_loss=True)
    pixel_values, mask = clip_and_mask(fused.config, batch=2)
    eager, eager_grads = run(fused, pixel_values, mask)
    torch._dynamo.reset()
    compiled, compiled_grads = run(torch.compile(fused), pixel_values, mask)
    compiled_grads = {n.removeprefix("_orig_mod."): g for n, g in compiled_grads.items()}
    assert_same(compiled, eager, compiled_grads, eager_grads)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
def test_bf16_autocast_within_hf_own_error(norm_pix):
    """Low precision: the patched model's error against a float64 run is at most twice the
    unpatched model's under the same autocast. The "auto" backend: bf16 tensors take the
    torch path under the interpreter."""
    hf, fused = twins(norm_pix_loss=norm_pix)
    pixel_values, mask = clip_and_mask(hf.config, batch=4)
    oracle = copy.deepcopy(hf).double()(pixel_values.double(), bool_masked_pos=mask)
    outputs = {}
    for name, model in (("hf", hf), ("fused", fused)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[name] = model(pixel_values, bool_masked_pos=mask)
    for field in ("loss", "logits"):
        got, hf_bf16 = getattr(outputs["fused"], field), getattr(outputs["hf"], field)
        assert got.dtype == hf_bf16.dtype, field
        assert_as_accurate(got, hf_bf16, getattr(oracle, field), torch.bfloat16, field, floor=False)


class _Clips(torch.utils.data.Dataset):
    def __init__(self, model_config, count):
        self.clips, self.masks = clip_and_mask(model_config, batch=count, ratio=0.9, tube=True)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        return {"pixel_values": self.clips[index], "bool_masked_pos": self.masks[index]}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_two_steps_match_unpatched(backend, tmp_path, accumulation):
    pytest.importorskip("accelerate")
    hf, fused = twins(norm_pix_loss=True)
    dataset = _Clips(hf.config, 4 * accumulation)
    assert_trainer_matches(fused, hf, dataset, tmp_path, accumulation, backend)


@pytest.mark.parametrize("how", ["instance", "class"])
def test_patched_model_pickles_and_keeps_the_fused_ops(how):
    import io
    import pickle

    if how == "instance":
        _, model = twins(norm_pix_loss=True)
    else:
        fastmae.hf.patch("videomae")
        model = transformers.VideoMAEForPreTraining(config(norm_pix_loss=True))
    try:
        pixel_values, mask = clip_and_mask(model.config, batch=2)
        with fastmae.use_backend("torch"):
            expected = model(pixel_values, bool_masked_pos=mask).loss
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
        copies.append(torch.load(buffer, weights_only=False))
        for clone in copies:
            with fastmae.use_backend("torch"):
                assert torch.equal(clone(pixel_values, bool_masked_pos=mask).loss, expected)
            forward = clone.videomae.embeddings.forward
            assert getattr(forward, "func", getattr(forward, "__func__", None)) is (
                fastmae.hf.videomae._embeddings_forward
            )
    finally:
        fastmae.hf.unpatch("videomae")


@pytest.mark.parametrize("how", ["instance", "class"])
def test_replaced_methods_present_hf_signatures(how):
    owners = ("", "videomae.embeddings", "videomae.embeddings.patch_embeddings")
    plain = transformers.VideoMAEForPreTraining(config())
    # Read before class patching, which changes plain's methods too.
    originals = {owner: inspect.signature(plain.get_submodule(owner).forward) for owner in owners}
    if how == "instance":
        patched = fastmae.hf.apply_fastmae(copy.deepcopy(plain))
    else:
        fastmae.hf.patch("videomae")
        patched = transformers.VideoMAEForPreTraining(config())
    try:
        for owner in owners:
            fused = inspect.signature(patched.get_submodule(owner).forward).parameters
            original = originals[owner].parameters
            # The pretraining forward adds one keyword: decoder masking's decoder_mask.
            added = ["decoder_mask"] if owner == "" else []
            assert [name for name in fused if name not in original] == added, owner
            assert [fused[name] for name in original] == list(original.values()), owner
    finally:
        fastmae.hf.unpatch("videomae")
