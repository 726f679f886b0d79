"""The clients' own loops, written out from their code, on fastmae and on the oracle side by
side: the official mae / mae_st engine step (``engine_pretrain.train_one_epoch`` with its loss
scaler), and a 20-step AdamW convergence run, for the image and video drop-ins and the
Hugging Face patch. Losses must agree at every step and parameters at the end."""

import copy
import math

import pytest
import torch

import fastmae
from tests.clients import DECODER_MASKED_FAMILIES, FAMILIES, comparable_parameters, make_family
from tests.conftest import BACKENDS
from tests.helpers import assert_as_accurate, assert_close


class LossScaler:
    """The official ``NativeScalerWithGradNormCount``: scale, backward, and on update steps
    unscale, (clip or) measure the gradient norm, step and update."""

    def __init__(self, enabled: bool):
        self.scaler = torch.amp.GradScaler("cpu", enabled=enabled)

    def __call__(self, loss, optimizer, parameters, update_grad: bool):
        self.scaler.scale(loss).backward()
        if not update_grad:
            return None
        self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm=math.inf)
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm


def engine_epoch(family, model, batches, accum_iter: int, autocast_dtype, seed: int):
    """``train_one_epoch`` line for line (no lr schedule, no logging): the step's loss values and
    the parameters afterwards. SGD with momentum, not the official AdamW: Adam divides each
    gradient by its own magnitude, so an element whose gradient is tiny (zero in exact
    arithmetic) takes a full step made of rounding noise, which would compare noise. The
    AdamW run is the convergence test's, which compares the losses it gives."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_scaler = LossScaler(enabled=autocast_dtype is not None)
    model.train(True)
    optimizer.zero_grad()
    torch.manual_seed(seed)  # the masks: one torch.rand per step, the same in both models
    losses = []
    for data_iter_step, samples in enumerate(batches):
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _, _ = family.call(model, samples)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise AssertionError(f"Loss is {loss_value}, stopping training")
        loss /= accum_iter
        loss_scaler(
            loss,
            optimizer,
            parameters=model.parameters(),
            update_grad=(data_iter_step + 1) % accum_iter == 0,
        )
        if (data_iter_step + 1) % accum_iter == 0:
            optimizer.zero_grad()
        losses.append(loss_value)
    return torch.tensor(losses, dtype=torch.float64), comparable_parameters(model)


@pytest.mark.parametrize("accum_iter", [1, 2])
@pytest.mark.parametrize("family_name", FAMILIES + DECODER_MASKED_FAMILIES)
def test_official_engine_fp32_matches_the_oracle(backend, family_name, accum_iter, fresh_seed):
    """fp32, 4 steps: the loss at every step, and the parameters afterwards, within float32
    rounding of the oracle's."""
    family = make_family(family_name)
    initial = comparable_parameters(family.oracle)
    batches = [family.sample(2) for _ in range(4)]
    fused_losses, fused_params = engine_epoch(
        family, family.fused, batches, accum_iter, None, fresh_seed
    )
    oracle_losses, oracle_params = engine_epoch(
        family, family.oracle, batches, accum_iter, None, fresh_seed
    )
    assert_close(fused_losses, oracle_losses)
    assert fused_params.keys() == oracle_params.keys() == initial.keys()
    assert not all(torch.equal(oracle_params[n], value) for n, value in initial.items())
    for name, value in oracle_params.items():
        assert_close(fused_params[name], value, "model", name)


@pytest.mark.parametrize("accum_iter", [1, 2])
@pytest.mark.parametrize("family_name", FAMILIES + DECODER_MASKED_FAMILIES)
def test_official_engine_bf16_within_the_oracle_own_error(family_name, accum_iter, fresh_seed):
    """bf16 autocast with the GradScaler, 4 steps: the losses' error against the oracle's fp32
    run of the same loop is at most twice the oracle's own bf16 error (bf16 cannot match bit
    for bit; errors are norms over the steps, as every rel_err here)."""
    family = make_family(family_name)
    batches = [family.sample(2) for _ in range(4)]
    exact_model = copy.deepcopy(family.oracle)
    exact, _ = engine_epoch(family, exact_model, batches, accum_iter, None, fresh_seed)
    oracle, _ = engine_epoch(family, family.oracle, batches, accum_iter, torch.bfloat16, fresh_seed)
    fused, _ = engine_epoch(family, family.fused, batches, accum_iter, torch.bfloat16, fresh_seed)
    assert_as_accurate(fused, oracle, exact, torch.bfloat16, "losses", floor=False)


# Every family on the torch path, the image family on each backend: twenty steps add state
# carried across steps, which the kernels' own per-step parity tests do not see, and that
# state lives in the same code for every family.
CONVERGENCE_CASES = [(name, "torch") for name in FAMILIES + DECODER_MASKED_FAMILIES]
CONVERGENCE_CASES += [("image", name) for name in BACKENDS if name != "torch"]


@pytest.mark.parametrize("family_name, backend_name", CONVERGENCE_CASES)
def test_twenty_adamw_steps_converge_with_the_oracle(family_name, backend_name, fresh_seed):
    """Liger-Kernel-style convergence: 20 AdamW steps of each model from the same weights,
    batches and masks; the loss curves agree to float32 rounding at every step."""
    with fastmae.use_backend(backend_name):
        converge(family_name)


def converge(family_name):
    family = make_family(family_name, norm_pix_loss=False)
    steps = [(family.sample(2), torch.rand(2, family.noise_length)) for _ in range(20)]
    curves = []
    for model in (family.fused, family.oracle):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        curve = []
        for imgs, noise in steps:
            loss, _, _ = family.call(model, imgs, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve, dtype=torch.float64))
    assert curves[1][-1] < curves[1][0]  # the oracle learns, so the comparison means something
    for step, (fused, oracle) in enumerate(zip(*curves)):
        assert_close(fused, oracle, "model", f"loss of step {step}")
