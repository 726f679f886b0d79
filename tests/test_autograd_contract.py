"""The oracle's autograd contract is fastmae's: what a caller may do with the outputs of the
oracle (in-place ops on the loss or on pred before backward, retain_graph, gradients of the
inputs, torch.func transforms) works on fastmae with the oracle's gradients, for the image and
video drop-ins and the Hugging Face patch."""

import pytest
import torch

from tests.clients import FAMILIES, make_family
from tests.helpers import assert_close, assert_tensors_match

# Decoder masking changes the step between the outputs and the parameters: its image form too.
CONTRACT_FAMILIES = (*FAMILIES, "image-decoder-masked")


def _backward(loss, pred, mask):
    loss.backward()


def _divide_in_place(loss, pred, mask):  # the official engine: loss /= accum_iter
    loss /= 4
    loss.backward()


def _multiply_by_tensor_in_place(loss, pred, mask):
    loss *= torch.tensor(0.5)
    loss.backward()


def _add_zero_in_place(loss, pred, mask):
    loss += 0
    loss.backward()


def _mul_(loss, pred, mask):
    loss.mul_(3)
    loss.backward()


def _pred_mul_(loss, pred, mask):
    pred.mul_(2)
    loss.backward()


def _pred_clamp_(loss, pred, mask):
    pred.clamp_(-0.1, 0.1)
    loss.backward()


def _pred_row_assigned(loss, pred, mask):
    pred[:, 0] = 0
    loss.backward()


def _mask_changed_after_backward(loss, pred, mask):
    loss.backward(retain_graph=True)
    mask.zero_()


def _retain_graph_twice(loss, pred, mask):
    loss.backward(retain_graph=True)
    loss.backward()


def _loss_of_loss_and_pred(loss, pred, mask):
    (loss * 2 + pred.square().mean()).backward()


USES = [
    _backward,
    _divide_in_place,
    _multiply_by_tensor_in_place,
    _add_zero_in_place,
    _mul_,
    _pred_mul_,
    _pred_clamp_,
    _pred_row_assigned,
    _mask_changed_after_backward,
    _retain_graph_twice,
    _loss_of_loss_and_pred,
]


PRED_IN_PLACE = (_pred_mul_, _pred_clamp_, _pred_row_assigned)


def gradients(family, model, imgs, noise, use, imgs_grad: bool):
    model.zero_grad()
    imgs = imgs.clone().requires_grad_(imgs_grad)
    loss, pred, mask = family.call(model, imgs, noise)
    value = loss.detach().clone()
    use(loss, pred, mask)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if imgs_grad:
        grads["imgs"] = imgs.grad.clone()
    return value, grads


# Every use, with and without the images' gradient, for the image drop-in; for the other
# families one use of each mechanism (the loss changed in place, pred changed in place, a
# second backward, pred's own gradient), with the images' gradient: the uses' paths through
# the fused ops are the same code in every family.
REPRESENTATIVE_USES = (_divide_in_place, _pred_mul_, _retain_graph_twice, _loss_of_loss_and_pred)
CASE_IDS = {False: "params", True: "params+imgs"}
CONTRACT_CASES = [
    *(("image", use, imgs_grad) for use in USES for imgs_grad in (False, True)),
    *(
        (family, use, True)
        for family in CONTRACT_FAMILIES
        if family != "image"
        for use in REPRESENTATIVE_USES
    ),
]


@pytest.mark.parametrize(
    "family_name, use, imgs_grad",
    CONTRACT_CASES,
    ids=lambda v: v.__name__.strip("_") if callable(v) else CASE_IDS.get(v, v),
)
def test_what_the_oracle_allows_works_with_its_gradients(backend, family_name, use, imgs_grad):
    family = make_family(family_name)
    imgs, noise = family.sample(3), torch.rand(3, family.noise_length)
    fused_loss, fused = gradients(family, family.fused, imgs, noise, use, imgs_grad)
    if family_name == "videomae" and use in PRED_IN_PLACE:
        # HF VideoMAE's MSELoss saves pred, so the oracle refuses in-place changes to it;
        # fastmae's loss keeps its own residual and allows them.
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            gradients(family, family.oracle, imgs, noise, use, imgs_grad)
        return
    oracle_loss, oracle = gradients(family, family.oracle, imgs, noise, use, imgs_grad)
    assert_close(fused_loss, oracle_loss)
    assert_tensors_match(fused, oracle)


@pytest.mark.parametrize("mask_requires_grad", [False, True], ids=["mask", "mask-with-grad"])
@pytest.mark.parametrize("family_name", ["image", "video"])
def test_forward_loss_in_place_uses_with_any_mask(backend, family_name, mask_requires_grad):
    """The official forward_loss on the caller's tensors: in-place ops on its loss and on pred
    before backward, with a 0/1 mask or a real mask that needs its own gradient."""
    family = make_family(family_name)
    imgs = family.sample(2)
    with torch.no_grad():
        _, pred, _ = family.oracle(imgs)
    mask = torch.rand(pred.shape[:2])
    results = []
    for model in (family.fused, family.oracle):
        leaf_pred = pred.clone().requires_grad_()
        leaf_mask = mask.clone().requires_grad_(mask_requires_grad)
        loss = model.forward_loss(imgs, leaf_pred * 1.0, leaf_mask)
        value = loss.item()
        loss /= 2
        loss.backward()
        grads = [leaf_pred.grad] + ([leaf_mask.grad] if mask_requires_grad else [])
        results.append((value, grads))
    assert_close(torch.tensor(results[0][0]), torch.tensor(results[1][0]))
    for fused_grad, oracle_grad in zip(results[0][1], results[1][1]):
        assert_close(fused_grad, oracle_grad)


@pytest.mark.parametrize("family_name", CONTRACT_FAMILIES)
def test_torch_func_grad_and_per_sample_vmap(any_backend, family_name):
    """torch.func.grad of the loss over the parameters, and vmap(grad(...)) for per-sample
    gradients, give the oracle's (the fused ops run the reference's op sequence there, and
    the Hugging Face patches HF's own code). HF VideoMAE's boolean indexing cannot be
    vmapped, in the oracle as in the patched model: grad alone there."""
    family = make_family(family_name)
    imgs, noise = family.sample(2), torch.rand(2, family.noise_length)

    def per_sample_grads(model):
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss_of(params, imgs, noise):
            kwargs = family.masking_kwargs(noise[None])
            outputs = torch.func.functional_call(model, params, (imgs[None],), kwargs)
            return outputs[0] if isinstance(outputs, tuple) else outputs.loss

        whole = torch.func.grad(lambda p: loss_of(p, imgs[0], noise[0]))(params)
        if family_name == "videomae":
            with pytest.raises(RuntimeError, match="vmap"):
                torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))(params, imgs, noise)
            return whole, None
        batched = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))(
            params, imgs, noise
        )
        return whole, batched

    fused_whole, fused_batched = per_sample_grads(family.fused)
    oracle_whole, oracle_batched = per_sample_grads(family.oracle)
    assert_tensors_match(fused_whole, oracle_whole)
    if oracle_batched is not None:
        assert_tensors_match(fused_batched, oracle_batched)
