"""Two generation-0 checkpoints of the 25-mode GMM for experiments/alemohammad: fitted and bad.

fitted.pt: the GMM family's own EM on each chain's real training set (exactly the data of
  `simulate experiment=alemohammad_gmm`), started from k-means (k-means++ seeding, then Lloyd
  iterations and hard-assignment covariances) instead of the family's default start. The default
  start gives every component the covariance of the whole data set (about 8 I for a target of
  std 0.05); the first E-step is then almost uniform, components merge and EM ends with ~12 of
  the 25 modes (measured: 8-15 per chain). Bertrand et al. and MAD start from a well-trained model;
  this is that model.
bad.pt: a deliberately bad model: every mean off its mode by N(0, 0.3^2) per coordinate (six mode
  standard deviations), component std 0.5 (ten times too wide), Dirichlet(1) weights.

Usage: python experiments/alemohammad/make_inits.py OUT_DIR [hydra overrides of the experiment]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from simulator import registry, seeding
from simulator.cli import CONFIG_DIR
from simulator.models.gmm import GMMFamily


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 30) -> torch.Tensor:
    """k-means centres (C, k, d) of x (C, n, d): k-means++ seeding, then Lloyd iterations."""
    chains, n, d = x.shape
    rows = torch.arange(chains)
    # k-means++ seeding: each new centre drawn with probability proportional to D^2.
    centres = [x[rows, torch.randint(n, (chains,), generator=generator)]]
    closest = (x - centres[0][:, None]).square().sum(-1)
    for _ in range(1, k):
        pick = torch.multinomial(closest / closest.sum(1, keepdim=True), 1, generator=generator)[:, 0]
        centres.append(x[rows, pick])
        closest = torch.minimum(closest, (x - centres[-1][:, None]).square().sum(-1))
    means = torch.stack(centres, 1)  # (C, k, d)
    for _ in range(iters):  # Lloyd iterations
        label = torch.cdist(x, means).argmin(-1)  # (C, n)
        onehot = torch.nn.functional.one_hot(label, k).to(x.dtype)  # (C, n, k)
        count = onehot.sum(1)  # (C, k)
        new = onehot.transpose(1, 2) @ x / count.clamp_min(1)[..., None]
        means = torch.where(count[..., None] > 0, new, means)  # an empty cluster keeps its centre
    return means


def kmeans_start(x: torch.Tensor, k: int, generator: torch.Generator, restarts: int = 10) -> dict:
    """GMM parameters (weights, means, covs) from the best of several k-means runs: hard clusters' moments."""
    chains, _, d = x.shape
    best, inertia = None, torch.full((chains,), float("inf"), dtype=x.dtype)
    for _ in range(restarts):  # one k-means++ run can seed two centres in one mode; keep the best per chain
        means = kmeans(x, k, generator)
        score = torch.cdist(x, means).min(-1).values.square().sum(-1)
        better = score < inertia
        best = means if best is None else torch.where(better[:, None, None], means, best)
        inertia = torch.minimum(score, inertia)
    means = best
    label = torch.cdist(x, means).argmin(-1)
    onehot = torch.nn.functional.one_hot(label, k).to(x.dtype)
    count = onehot.sum(1)
    diff = x[:, :, None] - means[:, None]  # (C, n, k, d)
    weighted = diff * onehot[..., None]
    covs = torch.einsum("cnki,cnkj->ckij", weighted, diff) / count.clamp_min(1)[..., None, None]
    covs = covs + 1e-4 * torch.eye(d, dtype=x.dtype)  # a one-point cluster would be singular
    weights = (count + 1e-3) / (count + 1e-3).sum(1, keepdim=True)
    return {"weights": weights, "means": means, "covs": covs}


def main(out: Path, overrides: list[str]) -> None:
    """Write out/fitted.pt and out/bad.pt for the composed experiment's chains and real data."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=alemohammad_gmm", *overrides])
    data = registry.make_data(cfg)  # the same real draw as the loop (seed, "data")
    x = data.train.double()
    chains, k = x.shape[0], int(cfg.model.options.components)
    g = seeding.generator(cfg.seed, "alemohammad-inits")

    model = GMMFamily(
        chains=chains,
        event_shape=data.event_shape,
        components=k,
        em_iters=int(cfg.model.options.em_iters),
        dtype="float64",
    )
    model.load_state_dict(kmeans_start(x, k, g))
    stats = model.fit(x)  # the family's own EM, warm-started from k-means
    fitted = {key: v.float() for key, v in model.state_dict().items()}

    truth = data.truth.params
    means = truth["means"].double().expand(chains, k, -1)
    means = means + 0.3 * torch.randn(means.shape, generator=g, dtype=torch.float64)
    covs = 0.25 * torch.eye(x.shape[-1], dtype=torch.float64).expand(chains, k, -1, -1)
    # Dirichlet(1) weights as normalised Exp(1) draws (torch.distributions would use the global RNG).
    gam = -torch.log(torch.rand(chains, k, generator=g, dtype=torch.float64))
    weights = gam / gam.sum(1, keepdim=True)
    bad = {"weights": weights.float(), "means": means.float(), "covs": covs.float().contiguous()}

    out.mkdir(parents=True, exist_ok=True)
    torch.save(fitted, out / "fitted.pt")
    torch.save(bad, out / "bad.pt")
    print(f"wrote {out}/fitted.pt (EM from k-means, {stats['em_iters']:.0f} iterations) and {out}/bad.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
