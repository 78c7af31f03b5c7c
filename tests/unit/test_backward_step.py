"""backward_step: exit losses and the received gradient in one autograd call, loss scale on both."""

import pytest
import torch

from megatron.core.pipeline_parallel.backward import backward_step, free_output, saving_aliases


def _stages():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)


def _losses(a, b, head, x, w_exit):
    h1 = torch.tanh(a(x))
    exit1 = head(h1).square().mean()  # an exit on stage 0
    h2 = torch.tanh(b(h1))
    exit2 = h2.sum() * 0.1  # an exit on the last stage
    final = head(h2).square().mean()
    return final + w_exit * (exit1 + exit2)


@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_split_equals_serial(scale):
    x = torch.randn(3, 4)
    a, b, head = _stages()
    _losses(a, b, head, x, 0.3).backward()
    want = [p.grad.clone() for p in (*a.parameters(), *b.parameters(), *head.parameters())]
    for p in (*a.parameters(), *b.parameters(), *head.parameters()):
        p.grad = None

    # stage 0 forward
    h1 = torch.tanh(a(x))
    exit1 = 0.3 * head(h1).square().mean()
    # stage 1 forward on a detached leaf, as the runtime receives it
    h1_in = h1.detach().requires_grad_()
    h2 = torch.tanh(b(h1_in))
    exit2 = 0.3 * h2.sum() * 0.1
    final = head(h2).square().mean()
    g = backward_step(final, None, exit2, loss_scale=scale, input_tensor=h1_in)
    backward_step(h1, g, exit1, loss_scale=scale)
    got = [p.grad / scale for p in (*a.parameters(), *b.parameters(), *head.parameters())]
    for gw, ww in zip(got, want):
        torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)


def test_exit_only_backward_sends_zeros_upstream():
    x = torch.randn(2, 4).requires_grad_()
    lin = torch.nn.Linear(4, 4)
    exit_loss = lin.weight.sum()  # does not depend on the input
    g = backward_step(None, None, exit_loss, input_tensor=x)
    assert torch.equal(g, torch.zeros_like(x))
    assert lin.weight.grad is not None


def test_hidden_output_needs_a_gradient():
    with pytest.raises(ValueError, match="gradient received"):
        backward_step(torch.ones(2, 3, requires_grad=True), None, None)


def _stage(x, w, exit_w):
    """A stage whose exit norm saves the output itself (as a post-exit head on a stage's last layer)."""
    y = torch.tanh(x @ w) + 1.0
    exit_loss = (torch.nn.functional.layer_norm(y, (4,)) @ exit_w).square().mean()
    return y, exit_loss


def test_freed_output_backpropagates_like_the_kept_one():
    """free_output keeps the shape and the graph and drops the storage; under saving_aliases the values
    autograd saved (here the exit norm's input, the output itself) survive, so gradients are exact."""
    g = torch.Generator().manual_seed(3)
    x, w, exit_w, grad = (torch.randn(3, 4, generator=g), torch.randn(4, 4, generator=g, requires_grad=True),
                          torch.randn(4, 2, generator=g, requires_grad=True), torch.randn(3, 4, generator=g))
    y, e = _stage(x, w, exit_w)
    backward_step(y, grad, e)
    want = [w.grad.clone(), exit_w.grad.clone()]
    w.grad = exit_w.grad = None
    with saving_aliases():
        y, e = _stage(x, w, exit_w)
    free_output(y)
    assert y.shape == (3, 4) and y.untyped_storage().nbytes() == y.element_size()
    backward_step(y, grad, e)
    assert torch.equal(w.grad, want[0]) and torch.equal(exit_w.grad, want[1])
    view = torch.randn(4, 4, requires_grad=True)[1:]
    free_output(view)  # a view's storage is its base's: left alone
    assert view.untyped_storage().nbytes() == 16 * view.element_size()


def test_step_losses_stay_on_the_device_until_the_step_ends():
    """Adding a microbatch's losses reads nothing back to the host (a meta tensor, which has no values,
    would fail at the first read); ``mean()`` reads every sum once, as the host precision it had before."""
    from megatron.core.pipeline_parallel.runtime import StepLosses

    on_device = StepLosses()
    for _ in range(3):
        on_device.add("lm loss", torch.empty((), device="meta", requires_grad=True))
        on_device.add("early loss [2]", torch.empty((), device="meta"))
    assert on_device.counts == {"lm loss": 3, "early loss [2]": 3}
    losses = StepLosses()
    for value in (1.0, 2.0, 4.5):
        losses.add("lm loss", torch.tensor(value, requires_grad=True))
    losses.add("early loss [2]", torch.tensor(0.25))
    assert losses.mean() == {"early loss [2]": 0.25, "lm loss": 2.5}
    assert StepLosses().mean() == {}
