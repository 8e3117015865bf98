"""The torch network of `SpatialGraph`: an MLP on each spot, residual graph layers, and a likelihood head.

Defined on first use, so that importing omx does not import torch.
"""

from __future__ import annotations


def _make_net():
    """Define the torch modules on first use, so that importing omx does not import torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class GraphLayer(nn.Module):
        """One residual message-passing update: mean (GCN) or attention aggregation over in-edges."""

        def __init__(self, hidden: int, conv: str, dropout: float):
            super().__init__()
            self.conv = conv
            self.lin = nn.Linear(hidden, hidden)
            self.norm = nn.LayerNorm(hidden)
            self.drop = nn.Dropout(dropout)
            if conv == "attention":
                self.att_src = nn.Parameter(torch.randn(hidden) / hidden**0.5)
                self.att_dst = nn.Parameter(torch.randn(hidden) / hidden**0.5)

        def forward(self, h, src, dst, weight):
            with torch.autocast(device_type=h.device.type, enabled=False):
                z = self.lin(h.float())
                if self.conv == "attention":
                    score = F.leaky_relu((z * self.att_src).sum(-1)[src] + (z * self.att_dst).sum(-1)[dst], 0.2)
                    top = torch.full((len(z),), -torch.inf, device=z.device).scatter_reduce(
                        0, dst, score, reduce="amax", include_self=True
                    )
                    e = torch.exp(score - top[dst])
                    denom = _aggregate(dst, src, e, torch.ones(len(z), 1, device=z.device))[:, 0]
                    weight = e / denom[dst]
                agg = _aggregate(dst, src, weight, z)
            return self.drop(F.gelu(self.norm(agg)))

    def _aggregate(dst, src, weight, z):
        """``out[i] = sum over edges (j -> i) of weight * z[j]``, as a sparse product.

        The sums come out the same whatever the number of threads (an ``index_add_`` of the messages does not,
        on the CPU).
        """
        adj = torch.sparse_coo_tensor(torch.stack([dst, src]), weight.float(), (len(z), len(z)), check_invariants=False)
        return torch.sparse.mm(adj, z)

    class GraphNet(nn.Module):
        """MLP on node features, residual graph layers, and a head for the likelihood."""

        def __init__(self, n_in, n_targets, *, hidden, n_layers, conv, dropout, likelihood):
            super().__init__()
            self.likelihood = likelihood
            self.n_targets = n_targets
            self.n_out = n_targets * (2 if likelihood == "zinb" else 1)
            self.mlp = nn.Sequential(
                nn.Linear(n_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
            )  # fmt: skip
            self.layers = nn.ModuleList([GraphLayer(hidden, conv, dropout) for _ in range(n_layers)])
            self.head = nn.Linear(hidden, self.n_out)
            if likelihood != "mse":
                self.log_theta = nn.Parameter(torch.full((n_targets,), 1.0))

        def init_bias(self, log_rate):
            if log_rate is not None:
                with torch.no_grad():
                    self.head.bias[: self.n_targets] = torch.as_tensor(log_rate)
                    self.head.weight[: self.n_targets].mul_(0.1)
                    if self.likelihood == "zinb":
                        self.head.bias[self.n_targets :] = -3.0

        def forward(self, x, src, dst, weight):
            h = self.mlp(x)
            for layer in self.layers:
                h = h + layer(h, src, dst, weight)
            return self.head(h)

        def loss(self, out, y, log_lib):
            out = out.float()
            g = self.n_targets
            if self.likelihood == "mse":
                return F.mse_loss(out, y)
            log_mu = out[:, :g].clamp(max=20.0) + log_lib[:, None]
            theta = torch.exp(self.log_theta)
            log_theta_mu = torch.logaddexp(torch.log(theta), log_mu)
            # log NB(y; mu, theta)
            nb = (
                theta * (torch.log(theta) - log_theta_mu)
                + y * (log_mu - log_theta_mu)
                + torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1.0)
            )  # fmt: skip
            if self.likelihood == "nb":
                return -nb.mean()
            logit = out[:, g:]
            nb_zero = theta * (torch.log(theta) - log_theta_mu)
            log_zero = torch.logaddexp(logit, nb_zero) - F.softplus(logit)
            log_pos = nb - F.softplus(logit)
            return -torch.where(y < 0.5, log_zero, log_pos).mean()

    return GraphNet


_NET = None


def graph_net(*args, **kwargs):
    """Build the network (the class is defined on first use, with torch)."""
    global _NET
    if _NET is None:
        _NET = _make_net()
    return _NET(*args, **kwargs)
