"""Toy vector targets with exact samplers and log-densities, the ground truth of the toy collapse runs.

Every source draws float32 samples on the generator's device (vectorised: no loop over samples) and
evaluates log_prob in float64, returned in the input's dtype. Defaults follow the common targets:

- gaussian:        N(mean, diag(std^2)) or N(mean, cov); dim 2, mean 0, std 1.
- gmm:             uniform mixture of isotropic Gaussians; 25 components on a 5x5 grid with spacing 2
                   (means in {-4,-2,0,2,4}^2) and std = spacing/40 = 0.05: the 25-mode target of the
                   mode-collapse literature. ``spacing`` is the distance between neighbouring means in
                   every layout (grid; circle of chord ``spacing``; random = uniform in a cube of side
                   spacing * K^(1/d), i.e. the grid's density of modes, drawn from ``seed``).
- eight_gaussians: 8 modes on a circle of radius 2, std 0.2.
- two_moons:       scikit-learn's make_moons geometry + isotropic noise 0.1, standardised per coordinate
                   by its exact mean and std (closed form, see TwoMoons). Density: Gauss-Legendre
                   quadrature over the arc parameter (log error < 1e-10, checked in the tests).
- checkerboard:    uniform on the 8 black squares of a 4x4 board on [-4,4]^2 (FFJORD's target).
- rings:           radii 1,2,3; radius |r_k + noise z| (folded normal), noise 0.1, uniform angle; ring k
                   has weight proportional to r_k, so every ring has the same density per unit length.

All sources expose the exact mean and covariance in Truth.params ("mean", "cov").
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from simulator.data.base import Dataset, Truth
from simulator.options import check, check_call, check_value, choose, options_schema
from simulator.seeding import child
from simulator.seeding import generator as seeded_generator

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)


def _error(field: str, message: str) -> ValueError:
    return ValueError(f"data.{field}: {message}")


def _plain(value: Any) -> Any:
    """Numbers and (nested) sequences, hydra's ListConfig included, as plain floats and lists."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (Sequence, np.ndarray)):
        return [_plain(v) for v in value]
    raise TypeError


def _floats(field: str, value: Any) -> torch.Tensor:
    """A finite float64 CPU tensor from a number, a (nested) list or a tensor; one-line error otherwise."""
    try:
        out = value.detach().cpu() if torch.is_tensor(value) else torch.tensor(_plain(value), dtype=F64)
    except (TypeError, ValueError):
        raise _error(field, f"must be a number or a list of numbers, got {value!r}") from None
    if not torch.isfinite(out).all():
        raise _error(field, f"must be finite, got {value!r}")
    return out.to(F64)


def _integer(field: str, value: Any, minimum: int) -> int:
    return check_value(f"data.{field}", int, value, low=minimum)


def _options(cls: type, **values: Any) -> None:
    """A source's options against its constructor's schema (simulator.options: types, bounds by name
    (noise, spacing, radius, extent > 0; dim, size >= 1; seed >= 0) and cls.OPTIONS); one line."""
    check_call("data", cls, **values)


def _per_item(field: str, value: Any, k: int, what: str) -> torch.Tensor:
    """A scalar broadcast to (k,), or a list of exactly k numbers."""
    out = _floats(field, value)
    if out.dim() == 0:
        return out.expand(k).clone()
    if out.shape != (k,):
        raise _error(field, f"must be a number or a list of {k} numbers (one per {what}), got {value!r}")
    return out


def _f32(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A float64 constant as float32 on the generator's device, where the draws are made."""
    return t.to(generator.device, torch.float32)


def _categorical(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of a component index: randint when uniform (fastest), else the inverse CDF."""
    dev = generator.device
    if bool((weights == weights[0]).all()):
        return torch.randint(0, len(weights), (n,), generator=generator, device=dev)
    cdf = torch.cumsum(weights.to(dev), 0)
    u = torch.rand(n, generator=generator, dtype=F64, device=dev) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_max(len(weights) - 1)


class ToySource:
    """Base of the toy targets: subclasses set dim and give _draw, _log_prob64 and _moments."""

    name = ""
    dim: int

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _log_prob64(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _extra_params(self) -> dict[str, torch.Tensor]:
        return {}

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n i.i.d. float32 draws (n, d) from the target, on the generator's device."""
        # Drawn in float32 (the output dtype, and twice as fast as float64 normals on CPU).
        return self._draw(_integer("n", n, 0), generator)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density (...) of x (..., d); float64 inside so tiny stds and far tails stay accurate."""
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"{self.name}.log_prob: expected (..., {self.dim}), got {tuple(x.shape)}")
        out = self._log_prob64(x.to(F64))
        return out.to(x.dtype if x.is_floating_point() else torch.float32)

    def params(self) -> dict[str, torch.Tensor]:
        """Exact parameters of the target as float32 CPU tensors; always "mean" (d,) and "cov" (d, d)."""
        mean, cov = self._moments()
        out = {"mean": mean, "cov": cov, **self._extra_params()}
        return {k: v.to(torch.float32).clone() for k, v in out.items()}

    def truth(self) -> Truth:
        """The sampler, exact log-density and parameters, for KL and parameter-distance metrics."""
        return Truth(sample=self.sample, log_prob=self.log_prob, params=self.params())

    def load(self, *, chains: int, n_train: int, n_test: int, generator: torch.Generator) -> Dataset:
        """An independent real train draw per chain (C, n_train, d) and a shared test draw (n_test, d)."""
        chains, n_train = _integer("chains", chains, 1), _integer("n_train", n_train, 1)
        n_test = _integer("n_test", n_test, 0)
        # Separate child streams: changing n_test (or chains) never changes the other split's draw.
        train = self.sample(chains * n_train, child(generator, "train")).reshape(chains, n_train, self.dim)
        test = self.sample(n_test, child(generator, "test"))
        return Dataset(train=train, test=test, truth=self.truth(), kind="vector")


class GaussianSource(ToySource):
    """N(mean, cov) in d dimensions: the target of every closed-form collapse result (docs/science.md)."""

    name = "gaussian"

    def __init__(self, *, dim: int | None = None, mean: Any = 0.0, std: Any = None, cov: Any = None) -> None:
        _options(GaussianSource, dim=dim)
        if std is not None and cov is not None:
            raise _error("cov", "give either std or cov, not both")
        mean_t = _floats("mean", mean)
        std_t = None if std is None else _floats("std", std)
        cov_t = None if cov is None else _floats("cov", cov)
        # The dimension is the one every list option agrees on; dim (default 2) only where none is a list.
        sizes = {"mean": mean_t.shape[0] if mean_t.dim() == 1 else None}
        sizes["std"] = std_t.shape[0] if std_t is not None and std_t.dim() == 1 else None
        sizes["cov"] = cov_t.shape[0] if cov_t is not None and cov_t.dim() >= 1 else None
        d = dim if dim is not None else next((s for s in sizes.values() if s), 2)
        for field, size in sizes.items():
            if size is not None and size != d:
                raise _error(field, f"has {size} entries but the dimension is {d}")
        if mean_t.dim() > 1:
            raise _error("mean", f"must be a number or a list of {d} numbers, got {mean!r}")
        if cov_t is None:
            std_t = _per_item("std", 1.0 if std is None else std, d, "dimension")
            if (std_t <= 0).any():
                raise _error("std", f"must be positive, got {std!r}")
            cov_t = torch.diag(std_t**2)
        elif cov_t.shape != (d, d):
            raise _error("cov", f"must be a {d}x{d} list of lists, got {cov!r}")
        elif not torch.allclose(cov_t, cov_t.T, rtol=0, atol=1e-12 * cov_t.abs().max().item()):
            raise _error("cov", "must be symmetric")
        chol, info = torch.linalg.cholesky_ex(cov_t)
        if info.item() != 0:
            raise _error("cov", "must be positive definite")
        self.dim, self._mean, self._cov, self._chol = d, mean_t.expand(d).clone(), cov_t, chol

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.dim, generator=generator, device=generator.device)
        return _f32(self._mean, generator) + z @ _f32(self._chol, generator).T

    def _log_prob64(self, x: torch.Tensor) -> torch.Tensor:
        chol = self._chol.to(x.device)
        diff = (x - self._mean.to(x.device)).reshape(-1, self.dim)
        z = torch.linalg.solve_triangular(chol, diff.T, upper=False)
        log_det = 2 * torch.log(torch.diagonal(chol)).sum()
        out = -0.5 * ((z**2).sum(0) + log_det + self.dim * LOG_2PI)
        return out.reshape(x.shape[:-1])

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mean, self._cov


class _IsotropicMixture(ToySource):
    """Mixture of N(means[k], stds[k]^2 I) with weights; exact log_prob by logsumexp over components."""

    def _set_mixture(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor) -> None:
        self.dim = means.shape[1]
        self._means, self._stds, self._weights = means, stds, weights / weights.sum()

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = _categorical(self._weights, n, generator)
        z = torch.randn(n, self.dim, generator=generator, device=generator.device)
        return _f32(self._means, generator)[k] + _f32(self._stds, generator)[k, None] * z

    def _log_prob64(self, x: torch.Tensor) -> torch.Tensor:
        means, stds = self._means.to(x.device), self._stds.to(x.device)
        flat = x.reshape(-1, self.dim)
        # Expanded squared distance: an (N, K) matmul instead of an (N, K, d) difference tensor.
        d2 = ((flat**2).sum(-1, keepdim=True) - 2 * flat @ means.T + (means**2).sum(-1)).clamp_min(0)
        comp = -0.5 * d2 / stds**2 - self.dim * (torch.log(stds) + 0.5 * LOG_2PI)
        out = torch.logsumexp(comp + torch.log(self._weights.to(x.device)), -1)
        return out.reshape(x.shape[:-1])

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        w, mu = self._weights, self._means
        mean = w @ mu
        second = torch.einsum("k,ki,kj->ij", w, mu, mu) + (w @ self._stds**2) * torch.eye(self.dim, dtype=F64)
        return mean, second - torch.outer(mean, mean)

    def _extra_params(self) -> dict[str, torch.Tensor]:
        return {"means": self._means, "stds": self._stds, "weights": self._weights}


class GMMSource(_IsotropicMixture):
    """A d-dimensional Gaussian mixture with grid, circle or random means (mode-collapse targets)."""

    name = "gmm"
    LAYOUTS = ("grid", "circle", "random")
    OPTIONS = {"layout": {"choices": LAYOUTS}}  # rules beyond the annotations and options.BOUNDS

    def __init__(
        self,
        *,
        dim: int = 2,
        components: int = 25,
        layout: str = "grid",
        spacing: float = 2.0,
        std: Any = None,
        weights: Any = None,
        seed: int = 0,
    ) -> None:
        _options(GMMSource, dim=dim, components=components, layout=layout, spacing=spacing, seed=seed)
        d, k = dim, components
        if layout == "grid":
            side = round(k ** (1 / d))
            if side**d != k:
                power = "a square number" if d == 2 else f"a perfect {d}-th power (dim={d})"
                raise _error("components", f"must be {power} for layout=grid, got {k}")
            ticks = (torch.arange(side, dtype=F64) - (side - 1) / 2) * spacing
            means = torch.cartesian_prod(*[ticks] * d).reshape(k, d)
        elif layout == "circle":
            if d < 2:
                raise _error("dim", f"must be >= 2 for layout=circle, got {d}")
            # Radius whose chord between neighbouring means is `spacing`; the circle lies in dims 0 and 1.
            radius = spacing / (2 * math.sin(math.pi / k)) if k > 1 else 0.0
            angle = 2 * math.pi * torch.arange(k, dtype=F64) / k
            means = torch.zeros(k, d, dtype=F64)
            means[:, 0], means[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
        else:
            # Fixed by the source's own seed, not the run's, so every run and chain sees the same target.
            side = spacing * k ** (1 / d)
            means = (torch.rand(k, d, generator=seeded_generator(seed, "gmm-means"), dtype=F64) - 0.5) * side
        stds = _per_item("std", spacing / 40 if std is None else std, k, "component")
        if (stds <= 0).any():
            raise _error("std", f"must be positive, got {std!r}")
        w = torch.ones(k, dtype=F64) if weights is None else _per_item("weights", weights, k, "component")
        if (w < 0).any() or w.sum() <= 0:
            raise _error("weights", f"must be non-negative with a positive sum, got {weights!r}")
        self._set_mixture(means, stds, w)


class EightGaussians(_IsotropicMixture):
    """Eight equal Gaussians on a circle (radius 2, std 0.2), starting at angle 0."""

    name = "eight_gaussians"
    OPTIONS = {"std": {"low": 0, "strict": True}}

    def __init__(self, *, radius: float = 2.0, std: float = 0.2) -> None:
        _options(EightGaussians, radius=radius, std=std)
        angle = 2 * math.pi * torch.arange(8, dtype=F64) / 8
        means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
        self._set_mixture(means, torch.full((8,), std, dtype=F64), torch.ones(8, dtype=F64))


class TwoMoons(ToySource):
    """make_moons: outer arc (cos t, sin t), inner arc (1 - cos t, 1/2 - sin t), t ~ U[0, pi], + noise.

    Exact moments of the noiseless arcs (t uniform, moon uniform): mean (1/2, 1/4), var_x 3/4,
    var_y 9/16 - 1/pi, cov_xy 1/8 - 1/pi; the noise adds noise^2 to each variance. ``standardize`` maps
    x -> (x - mean) / sqrt(var) per coordinate (StandardScaler with the exact constants); log_prob adds the
    log-Jacobian sum(log sqrt(var)). The density is (1/2) sum_moons (1/pi) int_0^pi N(x; c(t), noise^2 I) dt,
    by composite Gauss-Legendre: panels no wider than noise in t (the kernel's width along an arc of radius
    1 is about noise / sqrt(|x - centre|)), 8 nodes each, logsumexp over the weighted nodes; the log error
    is below 1e-10 near the data (relative 1e-10 in the far tail), checked against a 4x finer rule.
    """

    name = "two_moons"
    NODES_PER_PANEL = 8
    GRADED = 16  # geometric panels at each end, down to width 2^-16 of a uniform panel
    OPTIONS = {"panels": {"low": 4}}

    def __init__(self, *, noise: float = 0.1, standardize: bool = True, panels: int | None = None) -> None:
        _options(TwoMoons, noise=noise, standardize=standardize, panels=panels)
        self.noise = float(noise)
        panels = max(16, math.ceil(math.pi / self.noise)) if panels is None else panels
        self.dim, self.standardize, self.panels = 2, standardize, panels
        self._raw_mean = torch.tensor([0.5, 0.25], dtype=F64)
        c = 0.125 - 1 / math.pi
        s2 = self.noise**2
        self._raw_cov = torch.tensor([[0.75 + s2, c], [c, 0.5625 - 1 / math.pi + s2]], dtype=F64)
        if standardize:
            self._shift, self._scale = self._raw_mean, torch.sqrt(torch.diagonal(self._raw_cov))
        else:
            self._shift, self._scale = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
        # Composite Gauss-Legendre on [0, pi]: uniform panels, the end ones split geometrically, since
        # beyond an arc's end the integrand decays like exp(-t / (noise^2 / |x|)), far faster than noise.
        width = math.pi / self.panels
        grade = width * 2.0 ** -torch.arange(self.GRADED, -1, -1, dtype=F64)  # width 2^-G .. width
        inner = torch.arange(2, self.panels - 1, dtype=F64) * width
        cuts = torch.cat(
            [
                torch.zeros(1, dtype=F64),
                grade,
                inner,
                math.pi - grade.flip(0),
                torch.full((1,), math.pi, dtype=F64),
            ]
        )
        x, w = (torch.from_numpy(a).to(F64) for a in np.polynomial.legendre.leggauss(self.NODES_PER_PANEL))
        left, half = cuts[:-1, None], (cuts[1:] - cuts[:-1])[:, None] / 2
        t = (left + (x + 1) * half).reshape(-1)
        log_w = torch.log(w * half / math.pi).reshape(-1)
        self._nodes = torch.cat([self._arcs(t, 0), self._arcs(t, 1)])
        self._log_w = torch.cat([log_w, log_w]) - math.log(2)

    @staticmethod
    def _arcs(t: torch.Tensor, moon: torch.Tensor | int) -> torch.Tensor:
        """Noiseless points of the outer (moon 0) or inner (moon 1) arc at parameters t."""
        outer = torch.stack([torch.cos(t), torch.sin(t)], -1)
        inner = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], -1)
        if isinstance(moon, int):
            return inner if moon else outer
        return torch.where(moon[:, None].bool(), inner, outer)

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        dev = generator.device
        moon = torch.randint(0, 2, (n,), generator=generator, device=dev)
        t = torch.rand(n, generator=generator, device=dev) * math.pi
        z = torch.randn(n, 2, generator=generator, device=dev)
        raw = self._arcs(t, moon) + self.noise * z
        return (raw - _f32(self._shift, generator)) / _f32(self._scale, generator)

    def _log_prob64(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        flat = x.reshape(-1, 2) * self._scale.to(dev) + self._shift.to(dev)
        # -|x - c_j|^2 / 2s^2 = x.c_j / s^2 - |c_j|^2 / 2s^2 - |x|^2 / 2s^2: a matmul plus a per-node offset,
        # and the per-point term leaves the logsumexp.
        nodes = self._nodes.to(dev) / self.noise**2
        offset = self._log_w.to(dev) - 0.5 * (self._nodes.to(dev) ** 2).sum(-1) / self.noise**2
        out = torch.empty(flat.shape[0], dtype=F64, device=dev)
        step = max(1, 2**22 // len(nodes))  # bounds the (chunk, nodes) working set to ~32 MB
        for i in range(0, flat.shape[0], step):
            out[i : i + step] = torch.logsumexp(torch.addmm(offset, flat[i : i + step], nodes.T), -1)
        out -= 0.5 * (flat**2).sum(-1) / self.noise**2
        log_norm = -math.log(2 * math.pi * self.noise**2) + torch.log(self._scale).sum().item()
        return (out + log_norm).reshape(x.shape[:-1])

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        inv = 1 / self._scale
        return (self._raw_mean - self._shift) * inv, self._raw_cov * torch.outer(inv, inv)


class Checkerboard(ToySource):
    """Uniform on the black cells ((i + j) even, from the lower left) of a size x size board on [-e, e]^2."""

    name = "checkerboard"

    def __init__(self, *, size: int = 4, extent: float = 4.0) -> None:
        _options(Checkerboard, size=size, extent=extent)
        self.dim, self.size, self.extent = 2, size, float(extent)
        # One edge tensor serves the sampler and log_prob, so a sample never lands outside its own cell.
        self._edges = -self.extent + torch.arange(self.size + 1, dtype=F64) * (2 * self.extent / self.size)
        ij = torch.cartesian_prod(torch.arange(self.size), torch.arange(self.size))
        self._black = ij[(ij.sum(-1) % 2) == 0]
        # Float32 bounds of cell i: the smallest float32 >= edges[i], the largest float32 < edges[i + 1].
        lo, hi = self._edges[:-1].float(), self._edges[1:].float()
        self._lo32 = torch.where(lo.double() < self._edges[:-1], torch.nextafter(lo, hi), lo)
        self._hi32 = torch.where(hi.double() >= self._edges[1:], torch.nextafter(hi, lo), hi)
        self._log_density = -math.log(len(self._black) * (2 * self.extent / self.size) ** 2)

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        dev = generator.device
        cell = self._black.to(dev)[torch.randint(0, len(self._black), (n,), generator=generator, device=dev)]
        lo, hi = self._lo32.to(dev)[cell], self._hi32.to(dev)[cell]
        u = torch.rand(n, 2, generator=generator, device=dev)
        # The clamp undoes float32 rounding past the cell's upper edge, where log_prob would be -inf.
        return torch.minimum(torch.maximum(lo + (hi - lo) * u, lo), hi)

    def _log_prob64(self, x: torch.Tensor) -> torch.Tensor:
        edges = self._edges.to(x.device)
        # Half-open cells [edge_i, edge_{i+1}): the index with edges[i] <= x < edges[i + 1].
        ij = torch.searchsorted(edges, x.contiguous(), right=True) - 1
        inside = ((ij >= 0) & (ij < self.size)).all(-1)
        black = (ij.sum(-1) % 2) == 0
        out = torch.full(inside.shape, -math.inf, dtype=F64, device=x.device)
        out[inside & black] = self._log_density
        return torch.where(torch.isnan(x).any(-1), math.nan, out)

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = 2 * self.extent / self.size
        centres = self._edges[self._black] + h / 2
        mean = centres.mean(0)
        # Uniform on a cell of side h: the cell centre plus independent U(-h/2, h/2) coordinates.
        second = centres.T @ centres / len(centres) + (h**2 / 12) * torch.eye(2, dtype=F64)
        return mean, second - torch.outer(mean, mean)


class Rings(ToySource):
    """Concentric rings: p(x) = sum_k w_k f_k(|x|) / (2 pi |x|), f_k a folded normal (infinite at 0)."""

    name = "rings"
    WEIGHTINGS = ("radius", "uniform")
    OPTIONS = {"weighting": {"choices": WEIGHTINGS}}

    def __init__(
        self, *, radii: Any = (1.0, 2.0, 3.0), noise: float = 0.1, weighting: str = "radius"
    ) -> None:
        _options(Rings, noise=noise, weighting=weighting)
        r = _floats("radii", radii)
        if r.dim() != 1 or len(r) == 0 or (r <= 0).any():
            raise _error("radii", f"must be a non-empty list of positive numbers, got {radii!r}")
        self.dim, self.noise, self.weighting = 2, float(noise), weighting
        self._radii = r
        # "radius": equal density per unit length of ring, as in FFJORD's rings.
        w = r.clone() if self.weighting == "radius" else torch.ones_like(r)
        self._weights = w / w.sum()

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        dev = generator.device
        k = _categorical(self._weights, n, generator)
        z = torch.randn(n, generator=generator, device=dev)
        radius = (_f32(self._radii, generator)[k] + self.noise * z).abs()
        angle = 2 * math.pi * torch.rand(n, generator=generator, device=dev)
        return radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], -1)

    def _log_prob64(self, x: torch.Tensor) -> torch.Tensor:
        rho = torch.linalg.vector_norm(x, dim=-1)[..., None]
        r, s = self._radii.to(x.device), self.noise
        # Folded normal: the densities of N(r, s^2) at +rho and at -rho.
        folded = torch.logaddexp(-0.5 * ((rho - r) / s) ** 2, -0.5 * ((rho + r) / s) ** 2)
        log_f = folded - math.log(s) - 0.5 * LOG_2PI + torch.log(self._weights.to(x.device))
        return torch.logsumexp(log_f, -1) - math.log(2 * math.pi) - torch.log(rho[..., 0])

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Folding keeps R^2, so E[R^2] = r_k^2 + s^2; the uniform angle splits it equally over x and y.
        second = (self._weights @ (self._radii**2 + self.noise**2)) / 2
        return torch.zeros(2, dtype=F64), second * torch.eye(2, dtype=F64)

    def _extra_params(self) -> dict[str, torch.Tensor]:
        return {"radii": self._radii, "weights": self._weights}


TOY_SOURCES: dict[str, type[ToySource]] = {
    cls.name: cls for cls in (GaussianSource, GMMSource, EightGaussians, TwoMoons, Checkerboard, Rings)
}


def make_toy(name: str, **options: Any) -> ToySource:
    """The toy source called name, built from options; one-line ValueError for unknown names or options."""
    cls = TOY_SOURCES[choose("data.name", name, TOY_SOURCES)]
    check("data", options_schema(cls), options)  # type: ignore[arg-type]  # a class is hashable
    return cls(**options)
