r"""Batched conjugate gradient with per-element safeguards.

Solves a batch of linear systems :math:`M_i u_i = b_i`, :math:`i = 1..B`, given only the
products :math:`p_i \mapsto M_i p_i` (Hestenes & Stiefel, 1952). Each batch element runs its own
iteration; the elements only share the loop.

Algorithm (per element, starting from :math:`u_0 = 0`, :math:`r_0 = p_0 = b`):

.. math::
    \kappa_k = p_k^\top M p_k, \quad
    \alpha_k = \frac{r_k^\top r_k}{\kappa_k}, \quad
    u_{k+1} = u_k + \alpha_k p_k, \quad
    r_{k+1} = r_k - \alpha_k M p_k, \quad
    p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k .

On a symmetric positive definite :math:`M` of size :math:`m` it converges in at most :math:`m`
iterations. MMPS (Rozet et al., 2024) applies it to
:math:`M = \Sigma_y + A \mathbb{V}[x \mid x_t] A^\top`, where the covariance
:math:`\mathbb{V} = \sigma^2 J` comes from the Jacobian :math:`J` of a *learned* denoiser. At high
noise such a Jacobian is neither symmetric nor positive definite, and the textbook iteration
then divides by a curvature :math:`\kappa_k \approx 0` (or negative), producing huge or
non-finite iterates; a single ``0 / 0`` (an element that converged exactly, :math:`r^\top r = 0`)
turns into ``NaN``.

Safeguard. Every element carries an *active* flag and every division is guarded:

1. **Curvature safeguard.** An optional ``safeguard(p, kappa) -> (kappa_used, flagged)``
   inspects each curvature :math:`\kappa_k = p_k^\top M p_k` and may replace implausible ones.
   MMPS checks that the Rayleigh quotient of :math:`\mathbb{V}` along :math:`w = A^\top p`,
   :math:`\rho = w^\top \mathbb{V} w / \lVert w \rVert^2`, lies in :math:`[v_{\min},
   v_{\max}]` (with :math:`w^\top \mathbb{V} w` taken from the covariance term of the
   product, not as :math:`\kappa_k - p^\top \Sigma_y p`, which loses it to rounding when
   :math:`\Sigma_y` dominates); otherwise it steps with
   :math:`p^\top \Sigma_y p + \tilde\rho \lVert w \rVert^2`, where :math:`\tilde\rho` is a
   plausible positive value. A flagged element takes that one step and then stops, since
   conjugacy is lost (as in truncated CG, Steihaug 1983).
   Without a safeguard, an element with :math:`\kappa_k \le 0` stops *before* stepping; an
   element whose product :math:`M p_k` (or :math:`B p_k`, below) is not finite always does, so
   that :math:`u`, the residual and the image stay consistent.
2. **Convergence.** An element stops once :math:`\lVert r_k \rVert \le \text{rtol}\,
   \lVert b \rVert`; its search direction is zeroed, so later products cost nothing numerically
   and cannot create ``NaN``.
3. **Guarded divisions.** :math:`\alpha` and :math:`\beta` are computed with ``torch.where`` on
   safe denominators, so ``0 / 0`` never occurs; a step that would make an iterate non-finite
   (overflow) is rejected and the element stops.

All reductions are per element (over the last dimension), so a non-finite product in one element
never reaches another. A product :math:`M p` with a non-finite entry is detected through its
curvature :math:`p^\top M p`, which is then non-finite too; an element that does not step has
:math:`\alpha = 0`, so the updates need no per-element selection on the common path.

Image of the solution. When ``matvec`` returns a pair :math:`(M p, B p)` for a second linear map
:math:`B`, CG also accumulates :math:`B u = \sum_k \alpha_k B p_k` with its own step sizes, at
no extra product. MMPS uses it for the guidance :math:`\sigma_t^2 J^\top A^\top u`: with
:math:`M = \Sigma_y + A \sigma_t^2 J^\top A^\top` each product already computes
:math:`B p = \sigma_t^2 J^\top A^\top p`, so ``k`` iterations cost ``k`` vector-Jacobian
products instead of ``k + 1``. CG also returns its residual vector :math:`r = b - M u`; for
:math:`M = \Sigma_y + A B` it gives :math:`A (B u) = b - r - \Sigma_y u` without another
product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from diffem.samplers._rows import dot, finite_rows

__all__ = ["CGResult", "conjugate_gradient"]


class CGResult(NamedTuple):
    """Output of :func:`conjugate_gradient`; all tensors have a leading batch dimension ``B``."""

    solution: Tensor
    """``(B, m)`` approximate solutions :math:`u`."""
    residual: Tensor
    """``(B,)`` relative residuals ``||b - M u|| / ||b||`` (0 where ``b = 0``)."""
    iterations: Tensor
    """``(B,)`` number of steps taken by each element."""
    safeguarded: Tensor
    """``(B,)`` bool: whether a curvature safeguard stopped the element."""
    image: Tensor | None = None
    """``(B, n)`` :math:`B u` when ``matvec`` returns ``(M p, B p)``, else ``None``."""
    remainder: Tensor | None = None
    """``(B, m)`` the residual vector :math:`b - M u` as CG tracks it (``sum_k alpha_k M p_k``
    subtracted from ``b``; rows with a non-finite ``b`` are treated as ``b = 0``)."""


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]],
    b: Tensor,
    *,
    max_iter: int,
    rtol: float = 1e-6,
    safeguard: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> CGResult:
    r"""Solves the batch :math:`M_i u_i = b_i` with at most ``max_iter`` safeguarded CG steps.

    Parameters
    ----------
    matvec : callable
        ``p -> M p`` on ``(B, m)`` tensors, row by row, or ``p -> (M p, B p)`` with ``B p`` of
        shape ``(B, n)``, whose image ``B u`` of the solution is then accumulated.
    b : Tensor, shape ``(B, m)``
        Right-hand sides; rows that are not finite are solved as ``b = 0``.
    max_iter : int
        Maximum number of iterations (products with :math:`M`).
    rtol : float
        An element stops when its residual norm is at most ``rtol * ||b||``.
    safeguard : callable, optional
        ``(p, kappa) -> (kappa_used, flagged)``: given the search directions ``(B, m)`` and
        their curvatures :math:`\kappa = p^\top M p` ``(B,)`` (NaN where the product was not
        finite), the curvatures to step with and a ``(B,)`` bool telling which were replaced;
        see the module docstring.

    Returns
    -------
    CGResult
        ``solution (B, m)``, ``residual (B,)``, ``iterations (B,)``, ``safeguarded (B,)``,
        ``image (B, n)`` or ``None``, ``remainder (B, m)``.
    """
    if b.ndim != 2:
        raise ValueError(f"b must have shape (B, m), got {tuple(b.shape)}.")
    bb = dot(b, b)
    finite_b = torch.isfinite(bb)
    if not bool(finite_b.all()):
        b = torch.where(finite_b.unsqueeze(-1), b, 0.0)
        bb = torch.where(finite_b, bb, 0.0)
    u = torch.zeros_like(b)
    r, p, rr = b, b, bb
    tol2 = (rtol**2) * bb if rtol > 0 else torch.zeros_like(bb)
    active = rr > tol2
    iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    safeguarded = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    tiny = torch.finfo(b.dtype).tiny
    image: Tensor | None = None

    for k in range(max_iter):
        if not bool(active.any()):
            break
        mp = matvec(p)
        bp = None
        if isinstance(mp, tuple):
            mp, bp = mp
        curvature = dot(p, mp)
        finite = torch.isfinite(curvature)  # False where M p has a non-finite entry
        if safeguard is not None:
            used, flagged = safeguard(p, torch.where(finite, curvature, torch.nan))
            curvature = torch.nan_to_num(used, nan=0.0, posinf=0.0)
            flagged = flagged | ~finite
        else:
            flagged = ~finite | ~(curvature > 0)
        ok = active & finite & (curvature > tiny)
        if safeguard is None:
            ok = ok & ~flagged
        if not bool(finite.all()):  # such elements stop before stepping: alpha = 0, M p = 0
            mp = torch.where(finite.unsqueeze(-1), mp, 0.0)
        if bp is not None:
            finite_bp = finite_rows(bp)
            if not bool(finite_bp.all()):
                bp = torch.where(finite_bp.unsqueeze(-1), bp, 0.0)
                ok = ok & finite_bp
        alpha = torch.where(ok, rr / torch.where(ok, curvature, 1.0), 0.0).unsqueeze(-1)
        u_new = u + alpha * p
        r_new = r - alpha * mp
        rr_new = dot(r_new, r_new)
        valid = torch.isfinite(rr_new) & finite_rows(u_new)
        image_new = None
        if bp is not None:
            image_new = alpha * bp if image is None else image + alpha * bp
            valid = valid & finite_rows(image_new)
        if not bool(valid.all()):  # an overflowing step is rejected and the element stops
            keep = valid.unsqueeze(-1)
            u_new, r_new = torch.where(keep, u_new, u), torch.where(keep, r_new, r)
            rr_new = torch.where(valid, rr_new, rr)
            if image_new is not None:
                image_new = torch.where(keep, image_new, 0.0 if image is None else image)
            ok = ok & valid
        iterations = iterations + ok.long()
        safeguarded = safeguarded | (active & (flagged | ~valid))
        converged = rr_new <= tol2 if rtol > 0 else rr_new <= 0
        active = ok & ~flagged & ~converged
        if k + 1 < max_iter:
            beta = torch.where(active, rr_new / torch.where(active, rr, 1.0), 0.0)
            p = torch.where(active.unsqueeze(-1), r_new + beta.unsqueeze(-1) * p, 0.0)
        u, r, rr, image = u_new, r_new, rr_new, image_new

    norm_b = torch.sqrt(bb)
    residual = torch.where(norm_b > 0, torch.sqrt(rr) / torch.where(norm_b > 0, norm_b, 1.0), 0.0)
    return CGResult(u, residual, iterations, safeguarded, image, r)
