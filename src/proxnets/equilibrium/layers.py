"""OptEq layers: equilibria that are minimizers of an explicit convex objective.

With ``sigma = prox_f`` a proximal activation (:mod:`proxnets.equilibrium.prox`), the layer output
is the equilibrium

    z* = prox_f( W^T W z* + U x + b ),

which is exactly the first-order optimality condition of

    G(z; x) = sum_i f(z_i) + 1/2 |z|^2 - 1/2 |W z|^2 - <U x + b, z>.

The smooth part ``h(z) = 1/2 z^T (I - W^T W) z - <U x + b, z>`` has Hessian ``I - W^T W``, whose
eigenvalues lie in ``[1 - |W|_2^2, 1]``: ``G`` is convex for ``|W|_2 <= 1`` and ``(1 - |W|_2^2)``-strongly
convex for ``|W|_2 < 1`` (unique equilibrium). The map ``T(z) = prox_f(z - grad h(z))`` is a
proximal-gradient step of size ``1 = 1/L`` on ``G`` and a ``|W|_2^2``-contraction, so every solver of
:mod:`proxnets.solvers` applies and the relative residual ``|T(z) - z| / max(|T(z)|, |z|)`` is
the optimality certificate.

A prior ``l1 |z|_1`` adds a term to ``G`` and changes the activation to
``prox_{f + l1 |.|} = prox_f o soft_l1`` (a shifted ReLU for ``f`` = ReLU's indicator).

``|W|_2 <= target_norm < 1`` is kept by :func:`proxnets.equilibrium.parametrize.operator_norm_bound`
(the operator norm of the convolution at the layer's input size for :class:`OptEqConv2d`).

Equilibrium selection (``eps > 0``, the only way to allow ``target_norm = 1``). At ``|W|_2 = 1`` the
convex ``G`` may have a whole set ``S(x)`` of minimizers (equilibria). The layer then outputs the unique
minimizer of the strongly convex problem

    G_eps(z; x) = G(z; x) + eps/2 |z - a(x)|^2,        a(x) the anchor (an input-dependent module),

whose optimality condition ``0 in df(z) + (I - W^T W) z - (U x + b) + eps (z - a)`` is the fixed point of

    T_eps(z) = prox_f( (W^T W - eps I) z + U x + b + eps a(x) ),

a proximal-gradient step of size 1 on ``G_eps`` (its smooth part has Hessian ``(1 + eps) I - W^T W``, so
step 1 < 2 / L) and a ``q``-contraction, ``q = max(eps, |W|_2^2 - eps)`` (``prox_f`` nonexpansive, the
eigenvalues of ``W^T W - eps I`` lie in ``[-eps, |W|_2^2 - eps]``). ``G_eps`` is ``(1 + eps - |W|_2^2)``-strongly
convex. As ``eps -> 0`` its minimizer converges to the projection of ``a(x)`` onto ``S(x)`` (Tikhonov
regularization of a convex problem with a nonempty solution set: ``z_eps`` stays in the ball around the
projection ``p`` of radius ``|a - p|``, and every limit point minimizes ``|z - a|`` over ``S``); no bound of
``|z_eps - p|`` at a positive ``eps`` follows without more structure, so the certificate bounds only the
distance to ``z_eps``. Training differentiates the unique ``z_eps`` implicitly: the adjoint system
``(I - s (W^T W - eps I) s) h = s v`` is symmetric with eigenvalues ``>= eps``. With ``eps = 0`` everything
above is the plain OptEq layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from proxnets.equilibrium.implicit import BackwardConfig, attach_adjoint_hook, equilibrium
from proxnets.equilibrium.parametrize import operator_norm_bound, refresh_operator_norm
from proxnets.equilibrium.prox import ProxActivation, get_activation
from proxnets.solvers import ADJOINT_SOLVERS, SolverInfo as EquilibriumInfo, check_solver_options, relative_residual, solve, solve_linear
from proxnets.utils.convergence import handle_nonconvergence
from proxnets.utils.convergence import POLICIES
from proxnets.utils.validation import check_choice, check_int, check_number, check_tensor, fail

__all__ = ["OptEqBase", "OptEq", "OptEqConv2d", "ANCHORS"]

ANCHORS = ("linear", "feedforward", "zero")  # the named anchors a(x) of equilibrium selection (eps > 0)


class OptEqBase(nn.Module):
    """Shared solve/objective logic; subclasses define ``U`` (with bias ``b``) and ``W`` (no bias).

    Options (validated here): ``activation`` (registry name or :class:`ProxActivation`),
    ``activation_options``, ``l1`` (prior weight >= 0), ``target_norm`` in (0, 1), ``solver`` and
    ``solver_options``, ``tol`` > 0, ``max_iter``, ``backward`` in {"implicit", "phantom",
    "unrolled"} with ``backward_solver`` (default: conjugate gradient on the symmetrized adjoint,
    Anderson when f has no closed-form prox derivative) and its ``backward_options`` (e.g. ``{"fused": True}``,
    :func:`proxnets.solvers.solve_linear`), ``backward_tol``/``backward_max_iter``, ``warm_start``
    (start from the previous batch's equilibrium when shapes match), ``policy`` for
    non-convergence, ``track_objective`` (record ``G`` along the iterations), ``power_iterations``
    (per training forward, for the norm bound), ``eps`` in [0, 1) with ``anchor`` (equilibrium selection,
    module docstring: ``"linear"`` a learned affine map of x, ``"feedforward"`` ``a(x) = prox_f(U x + b)``,
    ``"zero"``, or an ``nn.Module`` mapping x to the shape of z); ``target_norm`` may be 1 only when
    ``eps > 0``.
    """

    def __init__(
        self,
        *,
        activation: str | ProxActivation = "relu",
        activation_options: dict | None = None,
        l1: float = 0.0,
        target_norm: float = 0.97,
        solver: str = "safeguarded_anderson",
        solver_options: dict | None = None,
        tol: float = 1e-4,
        max_iter: int = 100,
        backward: str = "implicit",
        backward_solver: str | None = None,
        backward_options: dict | None = None,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        warm_start: bool = False,
        policy: str = "warn",
        track_objective: bool = False,
        power_iterations: int = 16,
        eps: float = 0.0,
        anchor: str | nn.Module = "linear",
    ):
        super().__init__()
        self.eps = check_number("eps", eps, low=0.0, high=1.0, high_inclusive=False)
        if not (isinstance(anchor, nn.Module) or anchor in ANCHORS):
            fail("anchor", f"one of {list(ANCHORS)} or an nn.Module", anchor)
        self._anchor_spec = anchor
        # warm-started power iterations per training forward: each costs two single-sample
        # convolutions (negligible next to a batched solve); one is not enough, since training
        # can grow a direction the stale vector does not see and push |W|_2 above the target
        self.power_iterations = check_int("power_iterations", power_iterations, low=1)
        self.base_activation = get_activation(activation, **(activation_options or {}))
        self.l1 = check_number("l1", l1, low=0.0)
        self.activation = self.base_activation.with_l1(self.l1)
        # |W|_2 = 1 leaves G convex but not strongly convex: allowed only with the selecting term eps > 0
        self.target_norm = check_number("target_norm", target_norm, low=0.0, high=1.0, low_inclusive=False,
                                        high_inclusive=self.eps > 0)
        self.solver_options = check_solver_options(solver, solver_options or {})
        self.solver = solver
        self.tol = check_number("tol", tol, low=0.0, low_inclusive=False)
        self.max_iter = check_int("max_iter", max_iter, low=1)
        if backward_solver is None:
            # CG on the symmetrized adjoint when prox_f has a closed-form derivative (the fastest,
            # see the benchmark); Anderson on the generic autograd adjoint otherwise
            symmetric = self.activation.derivative(torch.zeros(1, 1)) is not None
            backward_solver = "conjugate_gradient" if symmetric else "anderson"
        self.backward_config = BackwardConfig(
            backward,
            solver=backward_solver,
            tol=self.tol if backward_tol is None else backward_tol,
            max_iter=self.max_iter if backward_max_iter is None else backward_max_iter,
            options=backward_options,
        )
        if not isinstance(warm_start, bool):
            fail("warm_start", "a bool", warm_start, TypeError)
        self.warm_start = warm_start
        self.policy = check_choice("policy", policy, POLICIES)
        self.track_objective = bool(track_objective)
        self.last_info: EquilibriumInfo | None = None
        self._z_prev: torch.Tensor | None = None

    # --- the operators (subclasses) -------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_w(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``W z`` with weight tensor ``w`` (the parametrized weight, read once per forward)."""
        raise NotImplementedError

    def apply_wt(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``W^T y``."""
        raise NotImplementedError

    def _linear_anchor(self) -> nn.Module:
        """A fresh affine map ``x -> a(x)`` of the shape of ``z`` (subclasses)."""
        raise NotImplementedError

    def _build_anchor(self) -> None:
        """``self.anchor``: the anchor module (``None`` without selection, or for ``"feedforward"``/``"zero"``)."""
        spec = self._anchor_spec
        self.anchor = None
        if self.eps > 0:
            self.anchor = spec if isinstance(spec, nn.Module) else self._linear_anchor() if spec == "linear" else None

    # --- the mathematics ------------------------------------------------------------------
    def anchor_point(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor | None:
        """The anchor ``a(x)`` (shape of ``z``), ``None`` without selection (``eps = 0``).
        ``base`` (optional): ``U x + b``, for the ``"feedforward"`` anchor ``prox_f(U x + b)``."""
        if self.eps == 0:
            return None
        x = self._check_input(x)
        if self.anchor is not None:
            return self.anchor(x)
        if self._anchor_spec == "feedforward":
            return self.activation.prox(self.U(x) if base is None else base)
        return None  # "zero"

    def injection(self, x: torch.Tensor) -> torch.Tensor:
        """``U x + b`` (plus ``eps a(x)`` with selection): the constant of ``T``, shape of ``z``."""
        base = self.U(self._check_input(x))
        a = self.anchor_point(x, base)
        return base if a is None else base + self.eps * a

    def gram(self, z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """``W^T W z``."""
        w = self.W.weight if w is None else w
        return self.apply_wt(self.apply_w(z, w), w)

    def linear_part(self, z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """``M z = (W^T W - eps I) z``, the linear part of ``T`` (a fresh tensor)."""
        out = self.gram(z, w)
        return out.sub_(z, alpha=self.eps) if self.eps else out

    def contraction(self, w_bound: float) -> float:
        """``q = |M|_2 <= max(eps, w^2 - eps)`` for ``|W|_2 <= w_bound``: the Lipschitz constant of ``T``."""
        return max(self.eps, w_bound**2 - self.eps)

    def strong_convexity(self, w_bound: float) -> float:
        """``mu = 1 + eps - w^2``: ``G`` (``G_eps``) is ``mu``-strongly convex when ``mu > 0``."""
        return 1.0 + self.eps - w_bound**2

    def fixed_point_map(self, inj: torch.Tensor, w: torch.Tensor, cache: dict | None = None):
        """``T(z) = prox_f(M z + inj)``, ``M = W^T W - eps I``: a proximal-gradient step of size 1 on ``G``
        (``G_eps`` with selection; ``inj`` from :meth:`injection`).

        ``cache`` (optional dict, filled outside autograd only) receives the last evaluation:
        ``z`` (its input), ``wz = W z`` and ``out = T(z)``: the implicit step
        (:meth:`implicit_step`) records its gradient at that point instead of applying ``T`` again.
        """

        def T(z: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                return self.activation.prox(self.linear_part(z, w) + inj)
            # in place outside autograd: batch-sized allocations cost more than the arithmetic
            wz = self.apply_w(z, w)
            pre = self.apply_wt(wz, w).add_(inj)
            if self.eps:
                pre.sub_(z, alpha=self.eps)
            out = self.activation.prox_(pre)
            if cache is not None:
                cache.update(z=z, wz=wz, out=out)
            return out

        return T

    def weight_grad(self, z: torch.Tensor, wz: torch.Tensor, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``d/dw <q, M z> = d/dw <W q, W z>`` (the ``eps`` term has no weight) with ``wz = W z`` given: one ``W q`` and two weight
        gradients of ``W`` (subclasses give closed forms; this default uses autograd)."""
        w_ = w.detach().requires_grad_()
        with torch.enable_grad():
            both = self.apply_w(torch.cat([q, z]), w_)  # (2B, ...): W q and (recomputed) W z
            wq = both[: q.shape[0]].detach()
            val = (both[: q.shape[0]] * wz).sum() + (both[q.shape[0]:] * wq).sum()
            return torch.autograd.grad(val, w_)[0]

    def objective(self, z: torch.Tensor, x: torch.Tensor | None = None, *, inj: torch.Tensor | None = None,
                  w: torch.Tensor | None = None) -> torch.Tensor:
        """``G(z; x)`` per sample, shape ``(B,)`` (``+inf`` outside the domain of f).

        With selection (``eps > 0``) the objective the equilibrium minimizes,
        ``G_eps - eps/2 |a|^2 = G + eps/2 |z|^2 - eps <a, z>`` (``inj`` from :meth:`injection` carries ``eps a``)."""
        if inj is None:
            if x is None:
                fail("x", "an input tensor (or inj=U x + b)", None)
            inj = self.injection(x)
        w = self.W.weight if w is None else w
        bsz = z.shape[0]
        wz = self.apply_w(z, w)
        quad = 0.5 * (1.0 + self.eps) * z.reshape(bsz, -1).pow(2).sum(1) - 0.5 * wz.reshape(bsz, -1).pow(2).sum(1)
        return self.activation.value(z) + quad - (inj * z).reshape(bsz, -1).sum(1)

    def optimality_residual(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample ``|T(z) - z| / max(|T(z)|, |z|)``: zero iff ``0`` is in the subdifferential of ``G`` at z."""
        with torch.no_grad():
            w = self.W.weight
            return relative_residual(z, self.fixed_point_map(self.injection(x), w)(z))

    def operator_norm(self, exact: bool = True) -> float:
        """``|W|_2`` of the weight the layer applies (after its parametrization), measured on that
        operator, never read from the parametrization's target: with ``exact`` a rigorous upper
        bound (:func:`proxnets.norm_bounds.norm_bound`), else a power-iteration (lower) estimate."""
        from proxnets.norm_bounds import norm_bound

        in_shape = (self.channels, *self.spatial) if hasattr(self, "spatial") else None
        return float(norm_bound(self.W, in_shape, method="auto" if exact else "power").value)

    def train(self, mode: bool = True) -> "OptEqBase":
        """Switching to eval mode runs the norm's power iteration to convergence (then frozen),
        so an evaluated model has ``|W|_2 <= target_norm`` up to the estimator's accuracy."""
        was_training = self.training
        super().train(mode)
        if was_training and not mode:
            refresh_operator_norm(self.W)
        return self

    def attach_implicit(self, inj: torch.Tensor, w: torch.Tensor):
        """The implicit backward of OptEq in a symmetric, convex form.

        At ``z*`` with pre-activation ``p = W^T W z* + inj`` and ``d = prox_f'(p)`` (in [0, 1], prox is
        monotone and nonexpansive), ``J^T = W^T W diag(d)``. With ``s = sqrt(d)`` and ``h = s g``, the
        adjoint equation ``g = J^T g + v`` becomes

            h = s W^T W (s h) + s v,       then    g = W^T W (s h) + v,

        whose map is a gradient step of size 1 on the convex quadratic
        ``1/2 h^T (I - s W^T W s) h - <s v, h>`` (``|s W^T W s|_2 <= |W|_2^2 < 1``): every solver of the
        registry applies, the accelerated one included, and conjugate gradient (affine, symmetric). Returns ``attach(z*) -> (z, adjoint)`` for
        :func:`proxnets.equilibrium.implicit.equilibrium`, or ``None`` when f has no closed-form
        derivative (autograd is used then).
        """
        if self.activation.derivative(inj[:1].detach()) is None:
            return None
        cfg = self.backward_config

        def attach(z_star: torch.Tensor):
            pre = self.linear_part(z_star, w) + inj  # recorded: connects z* to W, U, b and x
            z = self.activation.prox(pre)
            s = self._sqrt_derivative(self.activation.derivative(pre.detach()).clone())
            wd = w.detach()

            def adjoint(v: torch.Tensor):
                sv = s * v
                def H(h: torch.Tensor) -> torch.Tensor:  # s M (s h) + s v
                    return self.linear_part(s * h, wd).mul_(s).add_(sv)

                # CG starts from 0 (its first step already improves on s v); the others from s v = H(0)
                h0 = torch.zeros_like(sv) if cfg.solver == "conjugate_gradient" else sv
                h, binfo = solve(cfg.solver, H, h0, tol=cfg.tol, max_iter=cfg.max_iter, registry=ADJOINT_SOLVERS,
                                 **cfg.options)
                return self.linear_part(s * h, wd) + v, binfo

            return z, adjoint

        return attach

    # solvers of the registry known to return T's output of their last (checked) evaluation
    # unchanged, with that evaluation's input untouched: the cached step is then the returned point
    _CACHE_SAFE = ("fixed_point", "accelerated", "anderson", "safeguarded_anderson", "halpern")

    def _sqrt_derivative(self, d: torch.Tensor) -> torch.Tensor:
        """``s = sqrt(prox_f')`` of the symmetrized adjoint, in place on ``d``: prox' lies in [0, 1] (prox is monotone
        and nonexpansive; the clamp removes a user's round-off), and for a 0/1 derivative
        (:attr:`ProxActivation.binary_derivative`) the square root is the identity and is skipped."""
        d = d.clamp_(0.0, 1.0)
        return d if self.activation.binary_derivative else d.sqrt_()

    def adjoint_pre(self, v: torch.Tensor, s: torch.Tensor, w: torch.Tensor):
        """The gradient with respect to the pre-activation ``p`` of the implicit step, ``(q, info)``.

        With ``d = prox_f'(p)`` and ``s = sqrt(d)`` the adjoint ``g = W^T W (d g) + v`` is, for ``h = s g``,

            (I - s W^T W s) h = s v,        and the gradient at p is   q = d g = s h,

        a symmetric positive definite system (``|s W^T W s|_2 <= |W|_2^2 < 1``; with selection ``W^T W`` reads
        ``M = W^T W - eps I`` and the eigenvalues of ``I - s M s`` are ``>= eps``): conjugate gradient by
        default (:func:`proxnets.solvers.solve_linear`), or any solver of the registry on the fixed-point
        form ``h = s W^T W (s h) + s v`` (a gradient step of size 1 on the same convex quadratic).

        Derivation. ``T(z) = prox_f(M z + inj)`` has Jacobian ``J = D M`` at ``z*``, ``D = diag(d)``,
        ``d = prox_f'(p)`` in ``[0, 1]``; in terms of the Hessian ``H = I - M`` of the smooth part of ``G``,
        ``J = D (I - H)``. The implicit function theorem gives ``dz*/dp = (I - D M)^{-1} D``, so the gradient at
        ``p`` for the upstream ``v`` is ``q = D (I - M D)^{-1} v = D g`` with ``(I - M D) g = v``: not symmetric
        (``M D != D M``), so CG does not apply to it as it stands. With ``S = diag(s)``, ``s = sqrt(d)``,
        ``D = S S``, multiply by ``S``: ``S g - S M S (S g) = S v``, i.e. ``(I - S M S) h = S v`` for ``h = S g``,
        and ``q = S S g = S h``. ``S M S`` is symmetric with ``|S M S|_2 <= |S|_2^2 |M|_2 <= |W|_2^2``. For ReLU
        (and every 0/1 derivative: soft threshold, box, their l1 compositions) ``S`` is the 0/1 projection on the
        active set ``A = {p > 0}``: the system is ``(I - M_AA) h_A = v_A`` with ``h = 0`` off ``A``, and CG
        from ``h0 = 0`` never leaves ``A`` (every Krylov vector is a multiple of ``S``). By Cauchy interlacing
        the eigenvalues of ``I - M_AA`` lie in ``[1 - |W|_2^2, 1]``, so ``kappa <= 1 / (1 - |W|_2^2)`` (17 at
        0.97) and CG's error in the ``A``-norm falls at least as ``2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k``
        (0.61 per iteration at 0.97, against 0.94 for the plain adjoint iteration). CG's stop uses the
        recurrence residual ``r_k`` (equal to ``S v - (I - S M S) h_k`` up to round-off; its finiteness and
        ``<p, A p> > 0`` are checked every iteration, a failure ends the run as diverged) and its ``info``
        (converged or not) is passed on to the layer's policy by :class:`_ImplicitStep`. The tests check the
        result against finite differences and the unrolled gradient in float64, and two broken variants (the
        mask dropped, ``d`` used where ``sqrt(d)`` belongs) against the same check.
        """
        cfg = self.backward_config
        sv = s * v
        if cfg.solver == "conjugate_gradient":
            sh = torch.empty_like(sv)  # reused: batch-sized allocations cost more than the arithmetic

            def A(h: torch.Tensor) -> torch.Tensor:  # (I - s M s) h = h - s (M (s h)), in place on the fresh M output
                msh = self.linear_part(torch.mul(s, h, out=sh), w)
                return torch.addcmul(h, msh, s, value=-1.0, out=msh)

            h, binfo = solve_linear(A, sv, tol=cfg.tol, max_iter=cfg.max_iter, **cfg.options)  # e.g. fused=True
        else:
            def H(h: torch.Tensor) -> torch.Tensor:  # s M (s h) + s v
                return self.linear_part(s * h, w).mul_(s).add_(sv)

            h, binfo = solve(cfg.solver, H, sv, tol=cfg.tol, max_iter=cfg.max_iter, registry=ADJOINT_SOLVERS,
                             **cfg.options)
        return h.mul_(s), binfo

    def _cached_step_applies(self, inj: torch.Tensor, w: torch.Tensor) -> bool:
        """The implicit gradient comes from the cached last evaluation (:meth:`implicit_step`)."""
        if not (torch.is_grad_enabled() and self.backward_config.mode == "implicit" and self.solver in self._CACHE_SAFE
                and (inj.requires_grad or w.requires_grad)):
            return False
        probe = torch.zeros(1, 1, dtype=inj.dtype)
        return self.activation.derivative(probe) is not None and self.activation.derivative_at_output(probe) is not None

    def implicit_step(self, inj: torch.Tensor, w: torch.Tensor, cache: dict, info: EquilibriumInfo,
                      policy: str) -> torch.Tensor | None:
        """The returned equilibrium ``z = T(z_k)`` (the solver's last evaluation, from ``cache``) as a
        differentiable function of ``inj`` and ``w`` with the implicit gradient, at no extra forward cost.

        Backward, for the upstream gradient ``v``: ``q`` from :meth:`adjoint_pre` (the gradient at the
        pre-activation ``p = W^T W z_k + inj``), then ``dL/dinj = q`` and ``dL/dw = d/dw <q, W^T W z_k>``
        (:meth:`weight_grad`, with the cached ``W z_k``). ``prox_f'`` comes from the output
        (:meth:`ProxActivation.derivative_at_output`). Returns ``None`` (use the recorded step) when the
        activation cannot give its derivative from its output.
        """
        out = cache["out"]
        d = self.activation.derivative_at_output(out)
        if d is None:
            return None
        s = self._sqrt_derivative(d)
        state = dict(layer=self, z=cache["z"], wz=cache["wz"], out=out, s=s, w=w.detach(), info=info, policy=policy)
        return _ImplicitStep.apply(inj, w, state)

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        inj = self.injection(x)  # (B, *z_shape)
        w = self.W.weight  # read once: the parametrization (power iteration) runs once per forward
        shape = tuple(inj.shape)
        if z0 is None:
            if self.warm_start and self._z_prev is not None and tuple(self._z_prev.shape) == shape:
                z0 = self._z_prev
            elif self.backward_config.mode == "unrolled":
                z0 = torch.zeros_like(inj)  # the recorded iteration starts at 0 (its documented gradient)
            else:
                # start at T(0) = prox_f(U x + b): the first iterate from 0, which needs no W^T W
                with torch.no_grad():
                    z0 = self.activation.prox(inj.detach())
                if not bool(torch.isfinite(z0).all()):
                    # a non-finite input x: start at 0 so that the solver reports it under the layer's
                    # policy (stop_reason "nonfinite"), as for any other non-finite iterate
                    z0 = torch.zeros_like(inj)
        else:
            check_tensor("z0", z0, shape=shape)
        what = f"{type(self).__name__} forward ({self.solver})"
        cfg = self.backward_config
        objective = None
        if self.track_objective or self.solver_options.get("restart") == "objective":
            inj_d, w_d = inj.detach(), w.detach()
            objective = lambda z: self.objective(z, inj=inj_d, w=w_d)  # noqa: E731
        if self._cached_step_applies(inj, w):
            cache: dict = {}
            T = self.fixed_point_map(inj.detach(), w.detach(), cache)
            with torch.no_grad():
                z_star, info = solve(self.solver, T, z0.detach(), tol=self.tol, max_iter=self.max_iter,
                                     objective=objective, **self.solver_options)
            handle_nonconvergence(info, self.policy, what)
            if cache.get("out") is z_star:  # the solver returned its last evaluation of T
                z = self.implicit_step(inj, w, cache, info, self.policy)
            else:  # it fell back to an earlier iterate (a non-finite run): one recorded step of T
                z, adjoint = self.attach_implicit(inj, w)(z_star)
                z = attach_adjoint_hook(z, adjoint, info, self.policy, what)
        else:
            z, info = equilibrium(
                self.fixed_point_map(inj, w), z0, solver=self.solver, tol=self.tol, max_iter=self.max_iter,
                solver_options=self.solver_options, objective=objective, backward=cfg,
                attach=self.attach_implicit(inj, w), policy=self.policy, what=what,
            )
        self.last_info = info
        if self.warm_start and bool(torch.isfinite(z).all()):  # never warm-start from a non-finite iterate
            self._z_prev = z.detach()
        return z


class _ImplicitStep(torch.autograd.Function):
    """``z*`` as a function of ``(inj, w)`` with the implicit gradient (:meth:`OptEqBase.implicit_step`)."""

    @staticmethod
    def forward(ctx, inj, w, state):  # noqa: D401
        ctx.state = state
        return state["out"].view_as(state["out"])

    @staticmethod
    def backward(ctx, v):
        st = ctx.state
        layer, w = st["layer"], st["w"]
        with torch.no_grad():
            q, binfo = layer.adjoint_pre(v, st["s"], w)
            st["info"].backward = binfo
            handle_nonconvergence(binfo, st["policy"], f"{type(layer).__name__} implicit backward (adjoint)")
            grad_inj = q if ctx.needs_input_grad[0] else None
            grad_w = layer.weight_grad(st["z"], st["wz"], q, w) if ctx.needs_input_grad[1] else None
        return grad_inj, grad_w, None


class OptEq(OptEqBase):
    """Dense OptEq: ``x (B, in_features) -> z* (B, features)``; ``W`` is ``width x features``.

    Keywords (all of :class:`OptEqBase`): ``activation`` (a name of :data:`~proxnets.equilibrium.prox.PROX_ACTIVATIONS`
    or a :class:`~proxnets.equilibrium.prox.ProxActivation`) with ``activation_options``, ``l1`` (L1 prior),
    ``target_norm`` (``|W|_2`` bound in (0, 1)), ``solver``/``solver_options``/``tol``/``max_iter`` (forward),
    ``backward`` (``"implicit" | "phantom" | "unrolled"``) with ``backward_solver``/``backward_options``/``backward_tol``/
    ``backward_max_iter``, ``warm_start``, ``policy`` (``"warn" | "raise" | "ignore"``), ``track_objective``,
    ``power_iterations``, ``eps``/``anchor`` (equilibrium selection; ``target_norm = 1`` allowed when ``eps > 0``).
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        width: int | None = None,
        activation: str | ProxActivation = "relu",
        activation_options: dict | None = None,
        l1: float = 0.0,
        target_norm: float = 0.97,
        solver: str = "safeguarded_anderson",
        solver_options: dict | None = None,
        tol: float = 1e-4,
        max_iter: int = 100,
        backward: str = "implicit",
        backward_solver: str | None = None,
        backward_options: dict | None = None,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        warm_start: bool = False,
        policy: str = "warn",
        track_objective: bool = False,
        power_iterations: int = 16,
        eps: float = 0.0,
        anchor: str | nn.Module = "linear",
    ):
        super().__init__(
            activation=activation, activation_options=activation_options, l1=l1, target_norm=target_norm,
            solver=solver, solver_options=solver_options, tol=tol, max_iter=max_iter, backward=backward,
            backward_solver=backward_solver, backward_options=backward_options, backward_tol=backward_tol,
            backward_max_iter=backward_max_iter,
            warm_start=warm_start, policy=policy, track_objective=track_objective, power_iterations=power_iterations,
            eps=eps, anchor=anchor,
        )
        self.in_features = check_int("in_features", in_features, low=1)
        self.features = check_int("features", features, low=1)
        self.width = check_int("width", features if width is None else width, low=1)
        self.U = nn.Linear(self.in_features, self.features)
        self.W = operator_norm_bound(
            nn.Linear(self.features, self.width, bias=False), target=self.target_norm, n_power_iterations=self.power_iterations
        )
        self._build_anchor()

    def _linear_anchor(self):
        return nn.Linear(self.in_features, self.features)

    def _check_input(self, x):
        return check_tensor("x", x, shape=(None, self.in_features), finite=False, nonempty=True, like=self)

    def apply_w(self, z, w):
        return F.linear(z, w)

    def apply_wt(self, y, w):
        return y @ w

    def weight_grad(self, z, wz, q, w):
        # W z = z w^T: d/dw <W q, W z> = (W z)^T q + (W q)^T z
        return wz.T @ q + F.linear(q, w).T @ z


class OptEqConv2d(OptEqBase):
    """Convolutional OptEq: ``x (B, in_channels, H, W) -> z* (B, channels, H, W)``.

    ``W`` is a ``channels -> width`` convolution (zero padding ``kernel_size // 2``), ``W^T`` its
    transposed convolution; ``|W|_2`` is the norm of that operator at ``spatial = (H, W)``, so the
    layer accepts only inputs of that size.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        spatial: Sequence[int],
        *,
        kernel_size: int = 3,
        width: int | None = None,
        activation: str | ProxActivation = "relu",
        activation_options: dict | None = None,
        l1: float = 0.0,
        target_norm: float = 0.97,
        solver: str = "safeguarded_anderson",
        solver_options: dict | None = None,
        tol: float = 1e-4,
        max_iter: int = 100,
        backward: str = "implicit",
        backward_solver: str | None = None,
        backward_options: dict | None = None,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        warm_start: bool = False,
        policy: str = "warn",
        track_objective: bool = False,
        power_iterations: int = 16,
        eps: float = 0.0,
        anchor: str | nn.Module = "linear",
    ):
        super().__init__(
            activation=activation, activation_options=activation_options, l1=l1, target_norm=target_norm,
            solver=solver, solver_options=solver_options, tol=tol, max_iter=max_iter, backward=backward,
            backward_solver=backward_solver, backward_options=backward_options, backward_tol=backward_tol,
            backward_max_iter=backward_max_iter,
            warm_start=warm_start, policy=policy, track_objective=track_objective, power_iterations=power_iterations,
            eps=eps, anchor=anchor,
        )
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.channels = check_int("channels", channels, low=1)
        self.width = check_int("width", channels if width is None else width, low=1)
        self.kernel_size = check_int("kernel_size", kernel_size, low=1)
        if self.kernel_size % 2 == 0:
            fail("kernel_size", "an odd integer (same-size padding)", kernel_size)
        if not (isinstance(spatial, (tuple, list)) and len(spatial) == 2 and all(isinstance(s, int) and s > 0 for s in spatial)):
            fail("spatial", "a pair (H, W) of positive ints", spatial)
        self.spatial = tuple(spatial)
        pad = self.kernel_size // 2
        self.U = nn.Conv2d(self.in_channels, self.channels, self.kernel_size, padding=pad)
        self.W = operator_norm_bound(
            nn.Conv2d(self.channels, self.width, self.kernel_size, padding=pad, bias=False),
            target=self.target_norm,
            in_shape=(self.channels, *self.spatial),
            n_power_iterations=self.power_iterations,
        )
        self._pad = pad
        self._build_anchor()

    def _linear_anchor(self):
        return nn.Conv2d(self.in_channels, self.channels, self.kernel_size, padding=self._pad)

    def _check_input(self, x):
        return check_tensor("x", x, shape=(None, self.in_channels, *self.spatial), finite=False, nonempty=True, like=self)

    def apply_w(self, z, w):
        return F.conv2d(z, w, padding=self._pad)

    def apply_wt(self, y, w):
        return F.conv_transpose2d(y, w, padding=self._pad)

    def weight_grad(self, z, wz, q, w):
        # d/dw <conv(a, w), c> = conv2d_weight(a, c): for <W q, W z> once with a = q, once with a = z
        wq = F.conv2d(q, w, padding=self._pad)
        return (torch.nn.grad.conv2d_weight(q, w.shape, wz, padding=self._pad)
                + torch.nn.grad.conv2d_weight(z, w.shape, wq, padding=self._pad))
