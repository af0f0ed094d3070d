"""Scaling-law fits for the model wind tunnel (MiniCPM paper section 3; docs/design.md, Algorithms / Wind tunnel).

L(N, D) = C_N N^-alpha + C_D D^-beta + L0, the compute envelope L(C) = b C^-a + L0, the batch-size law
bs = k / L^gamma and a sigmoid from ScalingBench loss to task accuracy. The power laws are fitted on
log-loss residuals (relative error) from several starts; their covariance gives prediction errors.
"""

import dataclasses
import itertools
import math

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

_EXPONENT_STARTS = (0.1, 0.3, 0.7)
_FLOOR_STARTS = (0.0, 0.5, 0.9)  # L0 starts as fractions of the lowest observed loss
_EXPONENT_BOUNDS = (1e-3, 3.0)


def _as_positive_1d(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be finite and positive")
    return array


def _check_lengths(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs differ in length: {lengths}")


def _power_law_sum(theta: np.ndarray, refs: tuple[float, ...], xs: list[np.ndarray]):
    """sum_k exp(theta[2k]) (x_k / ref_k)^-theta[2k+1] + theta[-1] over points [n], and its gradient
    w.r.t. theta [n, 2k + 1]."""
    columns, mean = [], theta[-1] + np.zeros_like(xs[0])
    for k, (x, ref) in enumerate(zip(xs, refs)):
        log_x = np.log(x / ref)
        term = np.exp(theta[2 * k] - theta[2 * k + 1] * log_x)
        mean = mean + term
        columns += [term, -term * log_x]
    columns.append(np.ones_like(mean))
    return mean, np.stack(columns, axis=-1)


@dataclasses.dataclass(frozen=True)
class PowerLawSum:
    """L(x_1..x_k) = sum_k A_k (x_k / ref_k)^-e_k + L0 with its parameter covariance.

    Internally each term is measured from a reference point ref_k (the geometric mean of the data), which
    keeps A_k and e_k nearly uncorrelated; `coefficient(k)` converts back to C_k in C_k x_k^-e_k.
    """

    theta: np.ndarray  # [2k + 1]: log A_1, e_1, ..., log A_k, e_k, L0
    cov: np.ndarray  # [2k + 1, 2k + 1]
    refs: tuple[float, ...]  # [k]

    def predict(self, *xs) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (delta method over the parameter covariance) of L at xs."""
        arrays = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in xs))
        flat = [a.reshape(-1) for a in arrays]
        mean, grad = _power_law_sum(self.theta, self.refs, flat)
        var = np.einsum("ni,ij,nj->n", grad, self.cov, grad)
        return mean.reshape(arrays[0].shape), np.sqrt(np.maximum(var, 0.0)).reshape(arrays[0].shape)

    def coefficient(self, k: int) -> tuple[float, float]:
        """C_k = A_k ref_k^e_k and its standard error (log-normal delta method)."""
        i = 2 * k
        log_ref = math.log(self.refs[k])
        log_c = self.theta[i] + self.theta[i + 1] * log_ref
        grad = np.zeros_like(self.theta)
        grad[i], grad[i + 1] = 1.0, log_ref
        log_c_std = math.sqrt(max(float(grad @ self.cov @ grad), 0.0))
        return math.exp(log_c), math.exp(log_c) * log_c_std

    def stderr(self, i: int) -> float:
        return math.sqrt(max(float(self.cov[i, i]), 0.0))


def _fit_power_law_sum(xs: list[np.ndarray], loss: np.ndarray) -> PowerLawSum:
    """Least squares on log(pred) - log(loss) from a grid of starts; covariance s^2 (J^T J)^-1."""
    num_terms = len(xs)
    num_params = 2 * num_terms + 1
    if len(loss) <= num_params:
        raise ValueError(f"need more than {num_params} points for {num_params} parameters, got {len(loss)}")
    refs = tuple(float(np.exp(np.mean(np.log(x)))) for x in xs)
    log_loss = np.log(loss)

    def residuals(theta: np.ndarray) -> np.ndarray:
        return np.log(_power_law_sum(theta, refs, xs)[0]) - log_loss

    def jacobian(theta: np.ndarray) -> np.ndarray:
        mean, grad = _power_law_sum(theta, refs, xs)
        return grad / mean[:, None]

    lower = [-np.inf, _EXPONENT_BOUNDS[0]] * num_terms + [0.0]
    upper = [np.inf, _EXPONENT_BOUNDS[1]] * num_terms + [float(loss.min())]
    best = None
    for exponents in itertools.product(_EXPONENT_STARTS, repeat=num_terms):
        for floor_fraction in _FLOOR_STARTS:
            floor = floor_fraction * float(loss.min())
            log_a = math.log(max(float(np.mean(loss)) - floor, 1e-6) / num_terms)
            start = [v for e in exponents for v in (log_a, e)] + [floor]
            result = scipy.optimize.least_squares(
                residuals, start, jac=jacobian, bounds=(lower, upper), x_scale="jac"
            )
            if best is None or result.cost < best.cost:
                best = result
    dof = len(loss) - num_params
    residual_variance = 2.0 * best.cost / dof
    cov = np.linalg.pinv(best.jac.T @ best.jac) * residual_variance
    return PowerLawSum(best.x, cov, refs)


def _fit_errors(predicted: np.ndarray, loss: np.ndarray) -> tuple[float, float]:
    """RMSE in loss units and the largest relative error."""
    rmse = float(np.sqrt(np.mean((predicted - loss) ** 2)))
    return rmse, float(np.max(np.abs(predicted - loss) / loss))


@dataclasses.dataclass(frozen=True)
class NDFit:
    """L(N, D) = C_N N^-alpha + C_D D^-beta + L0 fitted to (parameters, tokens, loss) triples."""

    law: PowerLawSum
    rmse: float
    max_rel_err: float

    @property
    def C_N(self) -> float:
        return self.law.coefficient(0)[0]

    @property
    def alpha(self) -> float:
        return float(self.law.theta[1])

    @property
    def C_D(self) -> float:
        return self.law.coefficient(1)[0]

    @property
    def beta(self) -> float:
        return float(self.law.theta[3])

    @property
    def L0(self) -> float:
        return float(self.law.theta[4])

    @property
    def params(self) -> dict[str, float]:
        return {"C_N": self.C_N, "alpha": self.alpha, "C_D": self.C_D, "beta": self.beta, "L0": self.L0}

    @property
    def stderr(self) -> dict[str, float]:
        law = self.law
        return {
            "C_N": law.coefficient(0)[1],
            "alpha": law.stderr(1),
            "C_D": law.coefficient(1)[1],
            "beta": law.stderr(3),
            "L0": law.stderr(4),
        }

    def predict(self, N, D) -> tuple[np.ndarray, np.ndarray]:
        """Predicted loss and its standard deviation at N parameters and D tokens."""
        return self.law.predict(N, D)

    def compute_optimal(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L under compute = 6 N D (closed form, as in Chinchilla)."""
        a, b = self.alpha, self.beta
        scale = (a * self.C_N / (b * self.C_D)) ** (1.0 / (a + b))
        n_opt = scale * (compute / 6.0) ** (b / (a + b))
        return n_opt, compute / (6.0 * n_opt)

    def to_dict(self) -> dict:
        return {**self.params, "stderr": self.stderr, "rmse": self.rmse, "max_rel_err": self.max_rel_err}


def fit_loss_nd(N, D, loss) -> NDFit:
    """Fits L(N, D) = C_N N^-alpha + C_D D^-beta + L0; N parameters, D tokens, all positive."""
    n, d, y = _as_positive_1d("N", N), _as_positive_1d("D", D), _as_positive_1d("loss", loss)
    _check_lengths(N=n, D=d, loss=y)
    law = _fit_power_law_sum([n, d], y)
    return NDFit(law, *_fit_errors(law.predict(n, d)[0], y))


@dataclasses.dataclass(frozen=True)
class ComputeFit:
    """The compute envelope L(C) = b C^-a + L0."""

    law: PowerLawSum
    rmse: float
    max_rel_err: float

    @property
    def b(self) -> float:
        return self.law.coefficient(0)[0]

    @property
    def a(self) -> float:
        return float(self.law.theta[1])

    @property
    def L0(self) -> float:
        return float(self.law.theta[2])

    @property
    def stderr(self) -> dict[str, float]:
        return {"b": self.law.coefficient(0)[1], "a": self.law.stderr(1), "L0": self.law.stderr(2)}

    def predict(self, compute) -> tuple[np.ndarray, np.ndarray]:
        """Envelope loss and its standard deviation at the given compute (FLOPs)."""
        return self.law.predict(compute)

    def to_dict(self) -> dict:
        return {
            "b": self.b,
            "a": self.a,
            "L0": self.L0,
            "stderr": self.stderr,
            "rmse": self.rmse,
            "max_rel_err": self.max_rel_err,
        }


def fit_loss_compute(compute, loss) -> ComputeFit:
    """Fits L(C) = b C^-a + L0 to envelope points (see `loss_envelope`)."""
    c, y = _as_positive_1d("compute", compute), _as_positive_1d("loss", loss)
    _check_lengths(compute=c, loss=y)
    law = _fit_power_law_sum([c], y)
    return ComputeFit(law, *_fit_errors(law.predict(c)[0], y))


def loss_envelope(compute, loss) -> tuple[np.ndarray, np.ndarray]:
    """The lowest loss reached at each compute: points no cheaper-or-equal trial beats, by compute [m]."""
    c, y = np.asarray(compute, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    _check_lengths(compute=c, loss=y)
    order = np.lexsort((y, c))  # by compute, ties by loss
    kept_compute, kept_loss = [], []
    for ci, yi in zip(c[order], y[order]):
        if not kept_loss or yi < kept_loss[-1]:
            kept_compute.append(ci)
            kept_loss.append(yi)
    return np.array(kept_compute), np.array(kept_loss)


@dataclasses.dataclass(frozen=True)
class LrOptimum:
    """The loss-minimising learning rate of one width: the vertex of a parabola in log lr."""

    lr: float  # the vertex (the best grid lr when the parabola is not convex)
    log_std: (
        float  # standard error of ln(lr) (NaN without a convex fit): lr is known within a factor exp(log_std)
    )
    loss: float  # the parabola's minimum (the best mean loss without a convex fit)
    best_grid_lr: float
    at_edge: bool  # the best grid lr is the grid's smallest or largest: the vertex extrapolates

    def to_dict(self) -> dict:
        """JSON-ready: a NaN log_std becomes None."""
        return {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in dataclasses.asdict(self).items()
        }


def lr_optimum(lrs, losses, window: int = 5) -> LrOptimum:
    """Fits loss = a x^2 + b x + c, x = ln(lr), by least squares to every point (seed repeats included) at the
    `window` distinct lrs nearest in rank to the one of lowest mean loss; the vertex's error is the delta
    method over the fit's covariance s^2 (X^T X)^-1 (its residuals hold the seed noise where seeds repeat)."""
    lr, y = _as_positive_1d("lr", lrs), np.asarray(losses, dtype=np.float64)
    _check_lengths(lr=lr, loss=y)
    grid = np.unique(lr)  # [g] ascending
    means = np.array([y[lr == g].mean() for g in grid])
    best = int(np.argmin(means))
    lo = max(0, min(best - window // 2, len(grid) - window))
    chosen = grid[lo : lo + window]
    keep = np.isin(lr, chosen)
    x = np.log(lr[keep])
    design = np.stack([x**2, x, np.ones_like(x)], axis=-1)  # [n, 3]
    coef, *_ = np.linalg.lstsq(design, y[keep], rcond=None)
    a, b, c = coef
    fallback = LrOptimum(
        float(grid[best]), math.nan, float(means[best]), float(grid[best]), best in (0, len(grid) - 1)
    )
    if len(x) <= 3 or a <= 0:
        return fallback
    dof = len(x) - 3
    cov = np.linalg.pinv(design.T @ design) * float(np.sum((design @ coef - y[keep]) ** 2)) / dof
    vertex = -b / (2 * a)
    grad = np.array([b / (2 * a**2), -1 / (2 * a), 0.0])  # d vertex / d (a, b, c)
    return LrOptimum(
        lr=float(np.exp(vertex)),
        log_std=float(np.sqrt(max(grad @ cov @ grad, 0.0))),
        loss=float(c - b**2 / (4 * a)),
        best_grid_lr=float(grid[best]),
        at_edge=fallback.at_edge,
    )


@dataclasses.dataclass(frozen=True)
class BatchSizeFit:
    """bs_opt = k / L^gamma, fitted as a line in log-log space (MiniCPM: k 1.21e9 tokens, gamma 6.24)."""

    k: float
    gamma: float
    stderr: dict[str, float]
    rmse_log: float  # RMSE of log(bs)

    def predict(self, loss) -> np.ndarray:
        """Optimal batch size at the given loss."""
        return self.k / np.asarray(loss, dtype=np.float64) ** self.gamma

    def to_dict(self) -> dict:
        return {"k": self.k, "gamma": self.gamma, "stderr": self.stderr, "rmse_log": self.rmse_log}


def fit_batch_size_law(loss, bs) -> BatchSizeFit:
    """Fits bs = k / L^gamma to (loss reached, optimal batch size) pairs; needs 3 or more pairs."""
    y, b = _as_positive_1d("loss", loss), _as_positive_1d("bs", bs)
    _check_lengths(loss=y, bs=b)
    if len(y) < 3:
        raise ValueError(f"need at least 3 (loss, batch size) pairs, got {len(y)}")
    line = scipy.stats.linregress(np.log(y), np.log(b))  # log bs = log k - gamma log L
    k = math.exp(line.intercept)
    residuals = np.log(b) - (line.intercept + line.slope * np.log(y))
    return BatchSizeFit(
        k=k,
        gamma=-line.slope,
        stderr={"k": k * line.intercept_stderr, "gamma": line.stderr},
        rmse_log=float(np.sqrt(np.mean(residuals**2))),
    )


@dataclasses.dataclass(frozen=True)
class SigmoidFit:
    """accuracy(L) = floor + (ceiling - floor) / (1 + exp(slope (L - midpoint))); falls as loss grows."""

    floor: float
    ceiling: float
    slope: float
    midpoint: float
    rmse: float

    def predict(self, loss) -> np.ndarray:
        loss = np.asarray(loss, dtype=np.float64)
        return _sigmoid(loss, self.floor, self.ceiling, self.slope, self.midpoint)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sigmoid(loss: np.ndarray, floor: float, ceiling: float, slope: float, midpoint: float) -> np.ndarray:
    return floor + (ceiling - floor) * scipy.special.expit(-slope * (loss - midpoint))


def fit_sigmoid(loss, accuracy) -> SigmoidFit:
    """Fits the loss -> accuracy sigmoid (ScalingBench loss to a task's accuracy); needs 5 or more points."""
    x = np.asarray(loss, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    _check_lengths(loss=x, accuracy=y)
    if len(x) < 5:
        raise ValueError(f"need at least 5 (loss, accuracy) points to fit 4 parameters, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("loss and accuracy must be finite")
    spread = max(float(np.ptp(x)), 1e-6)
    best, best_sse = None, np.inf
    for midpoint, slope in itertools.product(np.quantile(x, [0.25, 0.5, 0.75]), (1.0, 4.0, 16.0)):
        start = [float(y.min()), float(y.max()), slope / spread, float(midpoint)]
        try:
            params, _ = scipy.optimize.curve_fit(
                _sigmoid, x, y, p0=start, bounds=([-np.inf, -np.inf, 0.0, -np.inf], np.inf), maxfev=5000
            )
        except RuntimeError:  # this start did not converge; others may
            continue
        sse = float(np.sum((_sigmoid(x, *params) - y) ** 2))
        if sse < best_sse:
            best, best_sse = params, sse
    if best is None:
        raise ValueError("the sigmoid fit did not converge from any start")
    floor, ceiling, slope, midpoint = (float(v) for v in best)
    return SigmoidFit(floor, ceiling, slope, midpoint, rmse=math.sqrt(best_sse / len(x)))
