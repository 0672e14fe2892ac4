"""The seed article's worked example: backward() fills .grad, one SGD step subtracts lr * grad."""

import torch


def test_backward_then_sgd_step_matches_the_article():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = 100 * x
    loss = y.sum()
    assert x.grad is None
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([100.0, 100.0]))
    optim = torch.optim.SGD([x], lr=0.001)
    optim.step()
    torch.testing.assert_close(x.detach(), torch.tensor([0.9, 1.9]))


def test_not_zeroing_accumulates_the_gradient():
    """Without zero_grad a second backward adds to .grad: the accumulation the seed warns about."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    (100 * x).sum().backward()
    (100 * x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([200.0, 200.0]))
