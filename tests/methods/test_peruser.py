"""The shared per-user routine equals one independent Adam problem per user."""

import torch
import torch.nn.functional as F

from plrm.methods.peruser import fit_per_user


def _problem(seed=0, n_users=5, dim=3):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([1, 4, 2, 7, 3])[:n_users]
    owner = torch.repeat_interleave(torch.arange(n_users), counts)
    x = torch.randn(len(owner), dim, generator=g)
    return owner, x


def test_vectorized_equals_per_user_loop():
    """Summing per-user mean losses gives each user exactly its own gradient, and Adam is elementwise,
    so the stacked fit follows the U separate trajectories (up to float rounding)."""
    owner, x = _problem()
    loss = lambda theta, pos: -F.logsigmoid((theta * x[pos]).sum(-1))  # noqa: E731
    together = fit_per_user(torch.zeros(5, 3), owner, loss, steps=50, lr=0.1, l2=0.01)
    for u in range(5):
        rows = (owner == u).nonzero()[:, 0]
        alone = fit_per_user(torch.zeros(1, 3), torch.zeros(len(rows), dtype=torch.long),
                             lambda th, pos, rows=rows: -F.logsigmoid((th * x[rows][pos]).sum(-1)),
                             steps=50, lr=0.1, l2=0.01)
        torch.testing.assert_close(together[u], alone[0], rtol=1e-5, atol=1e-6)


def test_single_step_matches_hand_computed_adam():
    """One Adam step moves every coordinate by lr * sign(grad) (bias-corrected m/sqrt(v) = g/|g| at step 1).
    For user 0 with one pair x and theta=0: loss = -log sigmoid(theta.x), grad = -x/2, so theta = lr*sign(x)."""
    owner = torch.tensor([0, 1, 1])
    x = torch.tensor([[1.0, -2.0], [3.0, 1.0], [-1.0, 1.0]])
    out = fit_per_user(torch.zeros(2, 2), owner, lambda th, pos: -F.logsigmoid((th * x[pos]).sum(-1)), steps=1, lr=0.5)
    # user 1: grad = mean(-x/2) over its two pairs = -[2, 2]/2 / ... sign is -(+,+) -> theta = +0.5 each
    torch.testing.assert_close(out, torch.tensor([[0.5, -0.5], [0.5, 0.5]]), rtol=0, atol=1e-3)
