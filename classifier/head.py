"""The light head on top of frozen embeddings: gain (+ neighbours), logistic regression, MLP.

``gain_within`` (the default) is the ``gain`` ridge fitted on *within-task* variation:
embeddings and gains are centred per task before the fit (task fixed effects), so the
weights learn what makes one prompt harder than another of the same kind, not which task
is harder on average (a fact that does not carry over to a task never seen). Scores are a
linear function of the raw embedding, Platt-scaled on the raw training rows. In
leave-one-task-out validation it was the only head with every unit above random
(``classifier/loto.py``).

``gain`` (the default) regresses the expected quality gain of the strong model,
strong - weak clipped to [-1, 1], with ridge regression, then maps it to P(strong needed)
with a one-dimensional logistic fit (Platt scaling) folded into the same linear layer.
Regressing the gain uses the prompts where the weak model beats the strong one, which a
0/1 "strong needed" label treats like ties; in subject-grouped cross-validation on the
training split (six-layer features) it ranked better: MMLU APGR 0.578 vs 0.540 for
logreg.  ``logreg`` and ``mlp`` fit the 0/1 label directly (``logreg`` in numpy, class-
balanced, L2-penalised). ``mf`` is RouteLLM's matrix-factorisation router for one model
pair: with two models its bilinear score sigma(w . (v_strong - v_weak) * (W e)) is a
linear logit in the embedding ``e``, so it is a logistic regression trained, as RouteLLM
trains MF, on the decisive pairs only (one model right, the other wrong; ties dropped).

``gain_knn`` (the default) adds RouteLLM's similarity-weighted idea: the mean gain of the
``k`` training prompts most similar to this one, weighted by exp(temp * cosine). A linear
head sees only directions in embedding space; the neighbours carry local facts such as
"questions like this one, from this subject, trip the weak model". The two z-scored terms
are summed, the neighbours weighted 1.5 to 1, and Platt-scaled together. k=200 and
temp=20 won a 5-fold cross-validation on the training split over k in {50, 100, 200},
temp in {5, 10, 20} and l2 in {0.1, 0.3, 1} (MMLU 0.676, GSM8K 0.685 APGR); the gain
head alone scored about 0.66 and 0.62 there. The head then also stores the training
embeddings (float16, 7 MB).

Heads are trained with numpy/torch but stored as plain arrays and evaluated in numpy
(``head.npz``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEAD_KINDS = ("gain_within", "gain_knn", "gain", "logreg", "mf", "mlp")
# gain kinds: ridge penalty / n. gain_within: 1.0 chosen by leave-one-task-out validation
# over 0.3 / 0.6 / 1 / 2 (classifier/loto.py; docs/classifier.md).
DEFAULT_L2 = {"gain_within": 1.0, "gain_knn": 0.3, "gain": 0.3, "logreg": 1e-2, "mf": 1e-2, "mlp": 1e-2}
KNN_K, KNN_TEMP = 200, 20.0  # 5-fold CV on the training split; see the module doc
# The neighbour term's weight against the linear one (both z-scored). 5-fold CV on the
# training split, 3 seeds: 1.5 beat 1.0 on MMLU in all three (+0.3 to +0.5 APGR points;
# GSM8K -0.1 to +0.3); 0.5 and 2.0 were worse.
KNN_WEIGHT = 1.5


def neighbour_gain(q: np.ndarray, bank: np.ndarray, gain: np.ndarray, k: int, temp: float,
                   skip_self: bool = False) -> np.ndarray:
    """Similarity-weighted mean ``gain`` of each query's ``k`` nearest rows of ``bank``.

    Rows are L2-normalised, so the dot product is the cosine. ``skip_self`` (training:
    query i is bank row i) leaves each prompt out of its own neighbourhood.
    """
    k = min(k, len(bank) - int(skip_self))
    if k < 1:
        return np.zeros(len(q))
    out = np.empty(len(q))
    for start in range(0, len(q), 1024):  # bounded memory: 1024 x n similarities at a time
        sim = np.asarray(q[start : start + 1024], dtype=np.float32) @ bank.T
        if skip_self:
            rows = np.arange(sim.shape[0])
            sim[rows, rows + start] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        w = np.exp((np.take_along_axis(sim, top, 1) - 1.0) * temp)
        out[start : start + len(sim)] = (w * gain[top]).sum(1) / w.sum(1)
    return out


@dataclass
class Head:
    """Standardise, then linear (logreg) or ReLU hidden layer + linear (mlp); sigmoid out."""

    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray | None = None
    b2: np.ndarray | None = None
    bank: np.ndarray | None = None  # gain_knn: training embeddings (n, 384), float16
    bank_gain: np.ndarray | None = None  # ... and their clipped gains
    knn: np.ndarray | None = None  # ... [k, temp, weight of the neighbour term]

    def __post_init__(self) -> None:
        if self.bank is not None:  # stored as float16; scored in float32, converted once
            self.bank = np.asarray(self.bank, dtype=np.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        h = (x - self.mean) / self.std
        h = h @ self.w1 + self.b1
        if self.w2 is not None:
            h = np.maximum(h, 0.0) @ self.w2 + self.b2
        h = h.reshape(-1)
        if self.bank is not None:
            k, temp, weight = self.knn
            near = neighbour_gain(x[:, : self.bank.shape[1]], self.bank, self.bank_gain,
                                  int(k), float(temp))
            h = h + weight * near
        return h

    def predict(self, x: np.ndarray) -> np.ndarray:
        # float64 so that confident scores do not collapse into ties at 1.0
        return 1.0 / (1.0 + np.exp(-self.logits(x).astype(np.float64)))

    def save(self, path: Path) -> None:
        arrays = {k: v for k, v in vars(self).items() if v is not None}
        if self.bank is not None:
            arrays["bank"] = self.bank.astype(np.float16)
        with Path(path).open("wb") as fh:  # a file object keeps numpy from renaming it
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: Path) -> Head:
        with np.load(path) as z:
            return cls(**{k: z[k] for k in z.files})


def _ridge(x: np.ndarray, gain: np.ndarray, l2: float, weight: np.ndarray | None,
           groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted ridge of clipped ``gain`` on standardised ``x``: (mean, std, w, fitted).

    ``groups`` (one key per row): centre ``x`` and ``gain`` within each group before the
    fit, so only within-group differences shape the weights. ``fitted`` is on raw ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std
    g = np.clip(np.asarray(gain, dtype=np.float64), -1, 1)
    wt = np.ones(len(x)) if weight is None else np.asarray(weight, dtype=np.float64)
    keys = np.zeros(len(x)) if groups is None else np.asarray(groups)
    xc, gc = xs.copy(), g.copy()
    for k in np.unique(keys):
        m = keys == k
        xc[m] -= (wt[m] @ xs[m]) / wt[m].sum()
        gc[m] -= (wt[m] @ g[m]) / wt[m].sum()
    lam = l2 * len(x)
    xw = xc * wt[:, None]
    w = np.linalg.solve(xw.T @ xc + lam * np.eye(x.shape[1]), xw.T @ gc)
    return mean, std, w, xs @ w


def fit_gain(x: np.ndarray, gain: np.ndarray, y: np.ndarray, l2: float = 0.1,
             weight: np.ndarray | None = None, groups: np.ndarray | None = None) -> Head:
    """Ridge regression of ``gain`` on standardised ``x``, Platt-scaled to predict ``y``
    (within ``groups`` when given: see ``gain_within``)."""
    mean, std, w, pred = _ridge(x, gain, l2, weight, groups)
    a, c = _platt(pred, np.asarray(y, dtype=np.float64))
    return Head(mean.astype(np.float32), std.astype(np.float32),
                (a * w).reshape(-1, 1).astype(np.float32), np.array([c], dtype=np.float32))


def fit_gain_knn(x: np.ndarray, gain: np.ndarray, y: np.ndarray, l2: float = 0.3,
                 weight: np.ndarray | None = None, dim: int = 384, k: int = KNN_K,
                 temp: float = KNN_TEMP, knn_weight: float = KNN_WEIGHT) -> Head:
    """``fit_gain`` plus the neighbour term; both z-scored, summed (the neighbours'
    weighted by ``knn_weight``), then Platt-scaled.

    ``dim``: the leading columns of ``x`` that are the normalised sentence embedding.
    """
    mean, std, w, pred = _ridge(x, gain, l2, weight)
    bank = np.asarray(x, dtype=np.float32)[:, :dim].astype(np.float16)
    g = np.clip(np.asarray(gain, dtype=np.float32), -1, 1)
    near = neighbour_gain(bank, bank, g, k, temp, skip_self=True)
    pm, ps = pred.mean(), pred.std() + 1e-12
    nm, ns = near.mean(), near.std() + 1e-12
    ns /= knn_weight
    a, c = _platt((pred - pm) / ps + (near - nm) / ns, np.asarray(y, dtype=np.float64))
    # a * (z_linear + knn_weight * z_neighbours) + c, folded into the stored linear layer
    b1 = c - a * pm / ps - a * nm / ns
    return Head(mean.astype(np.float32), std.astype(np.float32),
                (a / ps * w).reshape(-1, 1).astype(np.float32), np.array([b1], dtype=np.float32),
                bank=bank, bank_gain=g, knn=np.array([k, temp, a / ns], dtype=np.float64))


def _platt(z: np.ndarray, y: np.ndarray, iters: int = 50, lam: float = 1.0
           ) -> tuple[float, float]:
    """Logistic fit y ~ sigmoid(a z + c) by Newton's method; slope kept positive.

    A small L2 penalty on the slope keeps it finite on separable data (tiny log sets).
    """
    sd = z.std() + 1e-12
    zs = np.c_[z / sd, np.ones_like(z)]
    theta = np.zeros(2)
    pen = np.diag([lam, 1e-6])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(zs @ theta)))
        hess = zs.T @ (zs * (p * (1 - p))[:, None]) + pen
        theta -= np.linalg.solve(hess, zs.T @ (p - y) + pen @ theta)
    return max(float(theta[0]) / sd, 1e-6), float(theta[1])


def fit_head(x: np.ndarray, y: np.ndarray, kind: str = "gain_knn", l2: float | None = None,
             gain: np.ndarray | None = None, hidden: int = 64, epochs: int = 200,
             seed: int = 0, weight: np.ndarray | None = None,
             groups: np.ndarray | None = None) -> Head:
    """Fit a head to features ``x`` (n, d) and 0/1 labels ``y`` (``gain`` for the gain kinds).

    Classification heads balance the two classes; gain heads take per-row ``weight``;
    ``gain_within`` centres within ``groups`` (each row's task).
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind must be one of {HEAD_KINDS}")
    l2 = DEFAULT_L2[kind] if l2 is None else l2
    if kind == "gain":
        return fit_gain(x, y if gain is None else gain, y, l2, weight)
    if kind == "gain_within":
        return fit_gain(x, y if gain is None else gain, y, l2, weight, groups)
    if kind == "gain_knn":
        return fit_gain_knn(x, y if gain is None else gain, y, l2, weight)
    if kind == "logreg":
        return fit_logistic(x, y, l2, weight, balance=True)
    if kind == "mf":
        g = np.asarray(y if gain is None else gain, dtype=np.float64)
        keep = g != 0  # decisive pairs only: which model won
        wt = np.ones(len(g)) if weight is None else np.asarray(weight, dtype=np.float64)
        if len(set((g[keep] > 0).tolist())) < 2:
            raise ValueError("the mf head needs prompts won by each model")
        return fit_logistic(np.asarray(x)[keep], (g[keep] > 0).astype(np.float64), l2,
                            wt[keep] * np.minimum(np.abs(g[keep]), 1.0), balance=False)
    import torch
    torch.manual_seed(seed)
    x = np.asarray(x, dtype=np.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(np.asarray(y, dtype=np.float32))
    pos = float(yt.mean().clamp(1e-3, 1 - 1e-3))
    weight = torch.where(yt > 0, 0.5 / pos, 0.5 / (1 - pos))
    d = x.shape[1]
    layers = [torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
              torch.nn.Linear(hidden, 1)]
    net = torch.nn.Sequential(*layers)
    bce = torch.nn.BCEWithLogitsLoss(weight=weight)

    def loss_fn() -> torch.Tensor:
        reg = sum((m.weight**2).sum() for m in net if isinstance(m, torch.nn.Linear))
        return bce(net(xt).squeeze(-1), yt) + l2 * reg

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    net.eval()
    lin = [m for m in net if isinstance(m, torch.nn.Linear)]
    arr = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in lin]
    return Head(mean, std, *arr[0], *arr[1])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, weight: np.ndarray | None = None,
                 balance: bool = True, iters: int = 30) -> Head:
    """L2-penalised logistic regression on standardised ``x`` by Newton's method (numpy).

    Minimises the weighted mean cross-entropy + ``l2`` * |w|^2. ``balance`` reweighs the
    two classes to equal totals, as the 0/1 "strong needed" label is rare (about 1 in 5).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = np.c_[(x - mean) / std, np.ones(len(x))]
    wt = np.ones(len(x)) if weight is None else np.asarray(weight, dtype=np.float64)
    if balance:
        pos = float(np.clip((wt * y).sum() / wt.sum(), 1e-3, 1 - 1e-3))
        wt = wt * np.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    wt = wt / wt.sum()
    pen = np.full(xs.shape[1], 2 * l2)
    pen[-1] = 1e-8  # the intercept is not penalised
    theta = np.zeros(xs.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(xs @ theta)))
        grad = xs.T @ (wt * (p - y)) + pen * theta
        hess = xs.T @ (xs * (wt * p * (1 - p))[:, None]) + np.diag(pen)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-7:
            break
    return Head(mean.astype(np.float32), std.astype(np.float32),
                theta[:-1].reshape(-1, 1).astype(np.float32), np.array([theta[-1]], dtype=np.float32))
