"""PyTorch reference steps that follow LibMTL's procedure (written for this benchmark).

LibMTL (Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR
2023) trains DB-MTL as follows, and :class:`TorchDBMTL` does the same:

1. one forward pass of the shared encoder and every head;
2. ``log(ℓ_t + 1e-8)`` per task, then ``T`` backward passes, ``retain_graph=True``
   for all but the last; after each, the shared parameters' ``.grad`` are copied
   into row ``t`` of a freshly allocated ``[T, P]`` matrix and zeroed (head
   gradients simply accumulate: only head ``t`` depends on loss ``t``);
3. the EMA ``buf ← g + β_k (buf − g)`` with ``β_k = β / k^σ``;
4. ``α_t = max_s ‖buf_s‖ / (‖buf_t‖ + 1e-8)``, ``u = Σ_t α_t buf_t`` written back
   into the shared parameters' ``.grad``;
5. ``torch.optim.Adam.step()``.

:class:`TorchEW` is the EW baseline: one backward of ``Σ_t ℓ_t`` and Adam.

The models mirror ``models.py`` layer for layer (``nn.Linear`` / ``nn.Conv2d``,
NCHW) and are loaded with the same NumPy initial values, so a step here and the
JAX step give the same parameters up to float32 rounding (checked in
``tests/benchmarks/``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchHPS", "TorchDBMTL", "TorchEW", "build_torch"]


def _lin(p: dict) -> nn.Linear:
    w = np.asarray(p["w"])
    m = nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        m.bias.copy_(torch.from_numpy(np.asarray(p["b"])))
    return m


def _conv(p: dict, *, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    w = np.asarray(p["w"])  # HWIO
    k, _, c_in, c_out = w.shape
    pad = dilation * (k - 1) // 2
    m = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dilation)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))))
        m.bias.copy_(torch.from_numpy(np.asarray(p["b"])))
    return m


class _MLPTrunk(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        self.l1, self.l2 = _lin(p["l1"]), _lin(p["l2"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.l2(F.relu(self.l1(x))))


class _ConvTrunk(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        self.c1, self.c2 = _conv(p["c1"], stride=2), _conv(p["c2"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c2(F.relu(self.c1(x))))


class _ASPPHead(nn.Module):
    def __init__(self, p: dict, dilations: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv(p["b0"])] + [_conv(p[f"b{i + 1}"], dilation=d) for i, d in enumerate(dilations)]
        )
        self.proj, self.out = _conv(p["proj"]), _conv(p["out"])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(b(z)) for b in self.branches], dim=1)
        return self.out(F.relu(self.proj(h)))


class TorchHPS(nn.Module):
    """Encoder + one decoder per task, as in LibMTL's HPS architecture."""

    def __init__(self, config: dict, params: dict):
        super().__init__()
        if config["kind"] == "mlp":
            self.encoder = _MLPTrunk(params["trunk"])
            self.decoders = nn.ModuleList([_lin(hp) for hp in params["heads"]])
        elif config["kind"] == "conv":
            self.encoder = _ConvTrunk(params["trunk"])
            self.decoders = nn.ModuleList([_ASPPHead(hp, config["dilations"]) for hp in params["heads"]])
        else:
            raise ValueError(f"unknown model kind {config['kind']!r}")

    def forward(self, x: torch.Tensor) -> list:
        z = self.encoder(x)
        return [d(z) for d in self.decoders]

    def shared_parameters(self) -> list:
        return list(self.encoder.parameters())


def _to_torch_batch(config: dict, batch: tuple) -> tuple:
    x, y = (np.asarray(a) for a in batch)
    if config["kind"] == "conv":  # NHWC -> NCHW
        x = x.transpose(0, 3, 1, 2)
        y = y.transpose(0, 1, 4, 2, 3)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


class TorchEW:
    """EW + Adam: ``Σ_t ℓ_t`` backward, ``Adam.step()``."""

    def __init__(self, config: dict, params: dict, batch: tuple, *, lr: float = 1e-4):
        self.model = TorchHPS(config, params)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.x, self.y = _to_torch_batch(config, batch)

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=False)
        preds = self.model(self.x)
        losses = torch.stack([F.mse_loss(p, self.y[t]) for t, p in enumerate(preds)])
        losses.sum().backward()
        self.opt.step()
        return losses.detach()


class TorchDBMTL:
    """DB-MTL + Adam following LibMTL's ``DB_MTL.backward`` (see module docstring)."""

    def __init__(
        self,
        config: dict,
        params: dict,
        batch: tuple,
        *,
        lr: float = 1e-4,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
    ):
        self.model = TorchHPS(config, params)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.x, self.y = _to_torch_batch(config, batch)
        self.shared = self.model.shared_parameters()
        self.grad_dim = sum(p.numel() for p in self.shared)
        self.num_tasks = len(self.model.decoders)
        self.grad_buffer = torch.zeros(self.num_tasks, self.grad_dim)
        self.beta, self.beta_sigma, self.k = beta, beta_sigma, 0

    def _grad2vec(self) -> torch.Tensor:
        g = torch.zeros(self.grad_dim)
        start = 0
        for p in self.shared:
            n = p.numel()
            if p.grad is not None:
                g[start : start + n] = p.grad.data.view(-1)
            start += n
        return g

    def _zero_shared(self) -> None:
        for p in self.shared:
            if p.grad is not None:
                p.grad.data.zero_()

    def _reset_grad(self, new: torch.Tensor) -> None:
        start = 0
        for p in self.shared:
            n = p.numel()
            p.grad.data = new[start : start + n].contiguous().view(p.data.size()).data.clone()
            start += n

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=False)
        preds = self.model(self.x)
        losses = torch.stack([F.mse_loss(p, self.y[t]) for t, p in enumerate(preds)])
        self.k += 1
        log_losses = torch.log(losses + 1e-8)
        grads = torch.zeros(self.num_tasks, self.grad_dim)
        for t in range(self.num_tasks):
            log_losses[t].backward(retain_graph=(t + 1) != self.num_tasks)
            grads[t] = self._grad2vec()
            self._zero_shared()
        beta_k = self.beta / self.k**self.beta_sigma
        self.grad_buffer = grads + beta_k * (self.grad_buffer - grads)
        norms = self.grad_buffer.norm(dim=-1)
        alpha = norms.max() / (norms + 1e-8)
        new = sum(alpha[t] * self.grad_buffer[t] for t in range(self.num_tasks))
        self._reset_grad(new)
        self.opt.step()
        return losses.detach()

    def params_numpy(self) -> dict:
        """Parameters in ``models.py`` layout (for comparison with JAX)."""
        return _params_numpy(self.model)


def _params_numpy(model: TorchHPS) -> dict:
    def lin(m: nn.Linear) -> dict:
        return {"w": m.weight.detach().numpy().T.copy(), "b": m.bias.detach().numpy().copy()}

    def conv(m: nn.Conv2d) -> dict:
        return {"w": m.weight.detach().numpy().transpose(2, 3, 1, 0).copy(), "b": m.bias.detach().numpy().copy()}

    enc = model.encoder
    if isinstance(enc, _MLPTrunk):
        trunk = {"l1": lin(enc.l1), "l2": lin(enc.l2)}
        heads = tuple(lin(d) for d in model.decoders)
    else:
        trunk = {"c1": conv(enc.c1), "c2": conv(enc.c2)}
        heads = []
        for d in model.decoders:
            hp = {f"b{i}": conv(b) for i, b in enumerate(d.branches)}
            hp["proj"], hp["out"] = conv(d.proj), conv(d.out)
            heads.append(hp)
        heads = tuple(heads)
    return {"trunk": trunk, "heads": heads}


TorchEW.params_numpy = lambda self: _params_numpy(self.model)  # type: ignore[attr-defined]


def build_torch(kind: str, config: dict, params: dict, batch: tuple, **kwargs: Any) -> Any:
    """``kind`` ``"ew"`` or ``"dbmtl"``: the stepper object (call ``.step()``)."""
    if kind == "ew":
        return TorchEW(config, params, batch, **kwargs)
    if kind == "dbmtl":
        return TorchDBMTL(config, params, batch, **kwargs)
    raise ValueError(f"unknown torch step kind {kind!r}; expected 'ew' or 'dbmtl'.")
