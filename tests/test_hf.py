"""fastmae.hf: the fused ops inside transformers' ViTMAE give the unpatched model's outputs and
gradients, on both backends; what the kernels do not handle falls back to HF's code."""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastmae  # noqa: E402
import fastmae.hf  # noqa: E402
from fastmae.kernels import launch_counts, reset_launch_counts  # noqa: E402
from fastmae.kernels._triton import fused_kernel_names  # noqa: E402
from tests.clients import assert_trainer_matches  # noqa: E402
from tests.configs import TINY_HF  # noqa: E402
from tests.helpers import assert_as_accurate, assert_close, assert_tensors_match  # noqa: E402

NUM_PATCHES = (32 // 8) ** 2


def config(**overrides):
    return transformers.ViTMAEConfig(**{**TINY_HF, **overrides})


def twins(cls=transformers.ViTMAEForPreTraining, **overrides):
    """An HF model and a patched deep copy of it (same weights)."""
    hf = cls(config(**overrides))
    fused = fastmae.hf.apply_fastmae(copy.deepcopy(hf))
    return hf, fused


def run(model, pixel_values, noise=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    model.zero_grad()
    out = model(pixel_values, noise=noise, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(fused_out, hf_out, fused_grads, hf_grads):
    assert torch.equal(fused_out.mask, hf_out.mask)
    assert torch.equal(fused_out.ids_restore, hf_out.ids_restore)
    assert_close(fused_out.loss, hf_out.loss)
    assert_close(fused_out.logits, hf_out.logits)
    assert "vit.embeddings.cls_token" in hf_grads
    assert_tensors_match(fused_grads, hf_grads)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_apply_matches_unpatched(backend, norm_pix, mask_ratio):
    hf, fused = twins(norm_pix_loss=norm_pix, mask_ratio=mask_ratio)
    pixel_values, noise = torch.randn(3, 3, 32, 32), torch.rand(3, NUM_PATCHES)
    reset_launch_counts()
    fused_out, fused_grads = run(fused, pixel_values, noise)
    counts = launch_counts()
    hf_out, hf_grads = run(hf, pixel_values, noise)
    assert_same(fused_out, hf_out, fused_grads, hf_grads)
    if backend == "triton":  # every fused kernel of a step ran
        assert fused_kernel_names() - {"_copy_patches_kernel"} <= set(counts)
        assert counts["_masking_kernel"] == 1 and counts["_masked_loss_bwd_kernel"] == 1
    else:
        assert counts == {}
    assert fused.vit.layernorm.eps == hf.config.layer_norm_eps == 1e-12  # the config's own


def test_same_seed_same_mask_without_noise(backend):
    hf, fused = twins()
    pixel_values = torch.randn(4, 3, 32, 32)
    fused_out, fused_grads = run(fused, pixel_values, seed=7)
    hf_out, hf_grads = run(hf, pixel_values, seed=7)
    assert_same(fused_out, hf_out, fused_grads, hf_grads)


def test_return_dict_false_gives_hf_tuple(backend):
    hf, fused = twins()
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
    try:
        expected = hf(pixel_values, noise=noise, return_dict=False)
    except AttributeError as error:  # transformers 4.40's own model fails so: fail alike
        with pytest.raises(AttributeError, match=str(error)):
            fused(pixel_values, noise=noise, return_dict=False)
        return
    got = fused(pixel_values, noise=noise, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for a, b in zip(got, expected):
        assert_close(a.float(), b.float())


def test_hidden_states_and_attentions_are_hf_own(backend):
    hf, fused = twins(attn_implementation="eager")
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
    kwargs = dict(noise=noise, output_hidden_states=True, output_attentions=True)
    got, expected = fused(pixel_values, **kwargs), hf(pixel_values, **kwargs)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    assert len(got.attentions) == len(expected.attentions) == 2
    for a, b in zip(
        got.hidden_states + got.attentions, expected.hidden_states + expected.attentions
    ):
        assert_close(a, b)


def test_gradient_checkpointing_is_hf_own(backend):
    hf, fused = twins()
    for model in (hf, fused):
        model.gradient_checkpointing_enable()
        model.train()
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
    fused_out, fused_grads = run(fused, pixel_values, noise)
    hf_out, hf_grads = run(hf, pixel_values, noise)
    assert_same(fused_out, hf_out, fused_grads, hf_grads)


def test_encoder_model_alone(backend):
    hf, fused = twins(transformers.ViTMAEModel)
    pixel_values, noise = torch.randn(3, 3, 32, 32), torch.rand(3, NUM_PATCHES)
    reset_launch_counts()
    got = fused(pixel_values, noise=noise)
    counts = launch_counts()
    expected = hf(pixel_values, noise=noise)
    assert torch.equal(got.mask, expected.mask) and torch.equal(
        got.ids_restore, expected.ids_restore
    )
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert ("_masking_kernel" in counts) == (backend == "triton")


def test_interpolate_pos_encoding_falls_back_to_hf(any_backend):
    forward = transformers.ViTMAEForPreTraining.forward
    if "interpolate_pos_encoding" not in inspect.signature(forward).parameters:
        pytest.skip(f"transformers {transformers.__version__} cannot interpolate ViTMAE positions")
    hf, fused = twins()
    pixel_values = torch.randn(2, 3, 48, 48)  # 6 x 6 patches, other than the config's 4 x 4
    reset_launch_counts()
    got, got_grads = run(fused, pixel_values, interpolate_pos_encoding=True)
    assert launch_counts() == {}  # HF's code ran, not the kernels
    expected, expected_grads = run(hf, pixel_values, interpolate_pos_encoding=True)
    assert_same(got, expected, got_grads, expected_grads)


def test_other_image_size_gives_hf_error(any_backend):
    _, fused = twins()
    with pytest.raises(ValueError, match="doesn't match model"):
        fused(torch.randn(1, 3, 40, 40))


def test_other_classes_are_refused():
    supported = r"supports 'vit_mae' \(ViTMAEForPreTraining, ViTMAEModel\), 'videomae' "
    supported += r"\(VideoMAEForPreTraining, VideoMAEModel\); got "
    with pytest.raises(TypeError, match=supported + r".*Linear \(model_type None\)"):
        fastmae.hf.apply_fastmae(torch.nn.Linear(2, 2))
    vit = transformers.ViTModel(
        transformers.ViTConfig(**{k: TINY_HF[k] for k in list(TINY_HF)[:6]})
    )
    with pytest.raises(TypeError, match=r"got transformers.models.vit.modeling_vit.ViTModel \(mo"):
        fastmae.hf.apply_fastmae(vit)
    with pytest.raises(ValueError, match=r"model_type must be one of 'vit_mae' .* got 'vit'"):
        fastmae.hf.patch("vit")


def test_patch_and_unpatch_the_classes(backend, tmp_path):
    hf_vitmae = fastmae.hf.vitmae.hf_vitmae
    original = hf_vitmae.ViTMAEEmbeddings.forward
    hf = transformers.ViTMAEForPreTraining(config(norm_pix_loss=True))
    hf.save_pretrained(tmp_path)  # a local folder: nothing is downloaded
    fastmae.hf.patch_vitmae()
    try:
        assert hf_vitmae.ViTMAEEmbeddings.forward is not original
        loaded = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path)
        pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
        reset_launch_counts()
        got, got_grads = run(loaded, pixel_values, noise)
        assert ("_unshuffle_fwd_kernel" in launch_counts()) == (backend == "triton")
    finally:
        fastmae.hf.unpatch_vitmae()
    assert hf_vitmae.ViTMAEEmbeddings.forward is original
    # The same folder unpatched (from_pretrained makes the position tables trainable, and the
    # model evaluates: both models alike).
    unpatched = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path)
    expected, expected_grads = run(unpatched, pixel_values, noise)
    assert_same(got, expected, got_grads, expected_grads)


def test_compile_matches_eager(backend):
    _, fused = twins(norm_pix_loss=True)
    pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
    eager, eager_grads = run(fused, pixel_values, noise)
    torch._dynamo.reset()
    compiled, compiled_grads = run(torch.compile(fused), pixel_values, noise)
    compiled_grads = {n.removeprefix("_orig_mod."): g for n, g in compiled_grads.items()}
    assert_same(compiled, eager, compiled_grads, eager_grads)


def test_bf16_autocast_within_hf_own_error():
    """Low precision: the patched model's error against a float64 run is at most twice the
    unpatched model's under the same autocast (bf16 cannot match fp32 bit for bit). The "auto"
    backend: the interpreter has no bfloat16, so bf16 tensors take the torch path."""
    hf, fused = twins(norm_pix_loss=True)
    pixel_values, noise = torch.randn(4, 3, 32, 32), torch.rand(4, NUM_PATCHES)
    oracle = copy.deepcopy(hf).double()(pixel_values.double(), noise=noise.double())
    outputs = {}
    for name, model in (("hf", hf), ("fused", fused)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[name] = model(pixel_values, noise=noise)
    for field in ("loss", "logits"):
        got, hf_bf16 = getattr(outputs["fused"], field), getattr(outputs["hf"], field)
        assert_as_accurate(got, hf_bf16, getattr(oracle, field), torch.bfloat16, field, floor=False)
    assert torch.equal(outputs["fused"].mask, oracle.mask.float())


class _Images(torch.utils.data.Dataset):
    def __init__(self, count):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, 32, 32, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index]}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_two_steps_match_unpatched(backend, tmp_path, accumulation):
    """Trainer divides the loss for gradient accumulation and calls accelerate's backward."""
    pytest.importorskip("accelerate")
    hf, fused = twins(norm_pix_loss=True)
    dataset = _Images(4 * accumulation)
    assert_trainer_matches(fused, hf, dataset, tmp_path, accumulation, backend)


@pytest.mark.parametrize("how", ["instance", "class"])
def test_patched_model_pickles_and_keeps_the_fused_ops(how, tmp_path):
    """pickle, torch.save of the whole model and deepcopy (EMA, DataParallel) work after
    apply_fastmae, and the copy still runs the fused ops with the same result."""
    import io
    import pickle

    if how == "instance":
        hf, fused = twins(norm_pix_loss=True)
    else:
        hf = transformers.ViTMAEForPreTraining(config(norm_pix_loss=True))
        fastmae.hf.patch_vitmae()
    try:
        model = fused if how == "instance" else hf
        pixel_values, noise = torch.randn(2, 3, 32, 32), torch.rand(2, NUM_PATCHES)
        # The copies are compared bit for bit on one backend: the Triton interpreter and the
        # torch path sum in different orders (compared across them, it failed for some seeds).
        with fastmae.use_backend("torch"):
            expected = model(pixel_values, noise=noise).loss
        buffer = io.BytesIO()
        torch.save(model, buffer)
        copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
        buffer.seek(0)
        copies.append(torch.load(buffer, weights_only=False))
        for clone in copies:
            with fastmae.use_backend("torch"):
                reset_launch_counts()
                assert torch.equal(clone(pixel_values, noise=noise).loss, expected)
            forward = clone.vit.embeddings.forward
            assert getattr(forward, "func", getattr(forward, "__func__", None)) is (
                fastmae.hf.vitmae._embeddings_forward
            )
    finally:
        fastmae.hf.unpatch_vitmae()


def test_pickles_from_before_the_package_still_load():
    """A patched model pickled when the ViTMAE patch lived in fastmae/hf.py names its methods
    fastmae.hf._embeddings_forward and so on: they still resolve."""
    import pickle

    _, fused = twins()
    # Protocol 0 names globals as text lines, so the module path can be rewritten in place.
    data = pickle.dumps(fused, protocol=0).replace(b"fastmae.hf.vitmae", b"fastmae.hf")
    assert b"fastmae.hf.vitmae" not in data
    clone = pickle.loads(data)
    assert clone.vit.embeddings.forward.func is fastmae.hf.vitmae._embeddings_forward


@pytest.mark.parametrize("how", ["instance", "class"])
def test_replaced_methods_present_hf_signatures(how):
    """Callers read inspect.signature(model.forward) (Trainer's columns; HF's tests look for
    output_attentions in its **kwargs): the fused methods present HF's own."""
    owners = ("", "vit.embeddings", "decoder")
    plain = transformers.ViTMAEForPreTraining(config())
    # Read before class patching, which changes plain's methods too.
    originals = {owner: inspect.signature(plain.get_submodule(owner).forward) for owner in owners}
    if how == "instance":
        patched = fastmae.hf.apply_fastmae(copy.deepcopy(plain))
    else:
        fastmae.hf.patch_vitmae()
        patched = transformers.ViTMAEForPreTraining(config())
    try:
        for owner in owners:
            assert inspect.signature(patched.get_submodule(owner).forward) == originals[owner]
    finally:
        fastmae.hf.unpatch_vitmae()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_pixel_dtypes_get_hf_behaviour(dtype):
    """pixel_values of another dtype than the model's, outside autocast: HF's own code runs
    and gives HF's error, not a failure inside the fused path."""
    hf, fused = twins()
    pixel_values = torch.randn(2, 3, 32, 32, dtype=dtype)
    with pytest.raises(RuntimeError) as hf_error:
        hf(pixel_values)
    reset_launch_counts()
    with pytest.raises(RuntimeError) as fused_error:
        fused(pixel_values)
    assert str(fused_error.value) == str(hf_error.value)
    assert launch_counts() == {}
