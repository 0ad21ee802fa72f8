"""cge: one direction per trained element, the coordinate-wise estimate of DeepZero."""

from __future__ import annotations

import math

from pydantic import Field

from zotune.methods.base import Estimator, MethodConfig
from zotune.methods.registry import register_estimator


class CGEConfig(MethodConfig):
    max_coordinates: int = Field(
        1024, ge=1, description="Refuse to train more elements than this: a step costs two forwards per element."
    )


@register_estimator
class CGE(Estimator):
    """Coordinate-wise gradient estimation (CGE) from DeepZero (Chen et al., 2024, "DeepZero:
    Scaling up Zeroth-Order Optimization for Deep Model Training", ICLR, arXiv:2310.02025)::

        g_i = (L(θ + ε·e_i) − L(θ − ε·e_i)) / (2ε)        for every trained element i

    which is the gradient to O(ε²) per coordinate, with no sampling variance. In the step's
    terms there are q = d directions (d trained elements in all), z_i = √d·e_i and offsets
    ±ε/√d, so each element moves by ε and ĝ = (1/q) Σ_i g_i z_i is that gradient, on the
    scale of SPSA's (E[zzᵀ] = I): a learning rate carries over. The cost is 2d forwards (d
    doubled ones with `dual`) per step and 3d scalars in each trajectory record, so it is for
    a few trained elements: norms only, a prefix, a classifier head. The directions follow
    the order of the trained parameters, then their flattened elements; `zo.num_directions`
    must stay 1.
    """

    name = "cge"
    paper = "Chen et al., 2024 (DeepZero), arXiv:2310.02025"
    Config = CGEConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.layout: dict[str, tuple[int, int]] = {}  # name -> (first coordinate, elements)
        self.d = 0  # trained elements in all, set by `num_directions`
        self._index: tuple[int, dict[str, dict[int, int]]] = (-1, {})  # step seed -> name -> {seed: element}

    def refusal(self, *, schedule, num_directions):
        if num_directions != 1:
            return (f"estimator 'cge' takes one direction per trained element: leave zo.num_directions at 1 "
                    f"(it is {num_directions})")
        return None

    def num_directions(self, sizes, asked):
        d = sum(sizes.values())
        if d > self.config.max_coordinates:
            raise ValueError(f"estimator 'cge' takes 2 forwards per trained element and these settings train {d:,} "
                             f"elements, more than its max_coordinates ({self.config.max_coordinates:,}): train "
                             "fewer parameters (params.include, e.g. [norm]), or raise zo.estimator.max_coordinates")
        self.d, start = d, 0
        for name, n in sizes.items():
            self.layout[name] = (start, n)
            start += n
        return d

    def offsets(self, eps):
        return eps / math.sqrt(self.d), -eps / math.sqrt(self.d)

    def directions(self, p, step, noise):
        import torch

        from zotune.noise import seed_for

        s = noise.step_seed(step)
        if self._index[0] != s:
            self._index = (s, {})
        start, n = self.layout[p.name]
        if p.name not in self._index[1]:
            self._index[1][p.name] = {seed_for(s, start + i, p.name): i for i in range(n)}
        index = self._index[1][p.name]
        scale = math.sqrt(self.d)
        param = p.param

        def coordinate(seed: int) -> torch.Tensor:
            z = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            if seed in index:
                z.view(-1)[index[seed]] = scale
            return z

        return coordinate
