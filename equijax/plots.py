"""Every figure equijax writes (PNG), and the only module that imports matplotlib.

Each function takes plain arrays or dicts and a path; none computes
physics. Imported on demand by the run code (the training report, the CLI,
the MD writer), so importing the library never loads matplotlib. Figures
are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot:
no window opens and the caller's backend (a notebook's inline one) is left
as it is.
"""

from __future__ import annotations

import json

import numpy as np
from matplotlib.figure import Figure


def _figure(rows: int = 1, cols: int = 1, figsize=(6, 4), **kwargs):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kwargs)


def learning_curve(metrics_path, png_path):
    """Validation MAEs against steps (PNG)."""
    rows = [json.loads(l) for l in open(metrics_path)] if metrics_path.exists() else []
    if not rows:
        return
    fig, ax = _figure(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [r["valid_energy_mae"] for r in rows], "o-")
    ax[0].set(xlabel="step", ylabel="energy MAE (meV/atom)", yscale="log", title="validation, EMA params")
    ax[1].plot(steps, [r["valid_forces_mae"] for r in rows], "o-", color="C1")
    ax[1].set(xlabel="step", ylabel="force MAE (meV/Å)", yscale="log")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def parity(e_ref, e_pred, f_ref, f_pred, path, title):
    """Predicted against reference energies (eV/atom) and force components (eV/Å), side by side."""
    fig, ax = _figure(1, 2, figsize=(9, 4))
    for a, (x, y, label) in zip(ax, ((e_ref, e_pred, "energy (eV/atom)"), (f_ref, f_pred, "force component (eV/Å)"))):
        a.plot(x, y, ".", ms=2, alpha=0.5)
        lo, hi = np.min([x.min(), y.min()]), np.max([x.max(), y.max()])
        a.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        a.set(xlabel=f"reference {label}", ylabel=f"predicted {label}", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def spectrum(freqs, path, title, intensities=None, width=10.0):
    """A harmonic spectrum: modes at ``freqs`` (cm⁻¹; imaginary ones, negative, left out) broadened by
    Gaussians of ``width`` (cm⁻¹), weighted by IR ``intensities`` (km/mol) or by one each."""
    x = np.linspace(0, max(4000.0, float(np.max(freqs, initial=0)) + 200), 4000)
    weights = np.ones_like(freqs) if intensities is None else np.asarray(intensities)
    keep = freqs > 0
    real, weights = freqs[keep], weights[keep]
    y = sum(w * np.exp(-0.5 * ((x - f) / width) ** 2) for f, w in zip(real, weights)) if len(real) else 0 * x
    fig, ax = _figure(figsize=(7, 3))
    ax.plot(x, y, lw=1)
    ax.vlines(real, 0, weights, color="C1", lw=0.6)
    label = "IR intensity (km/mol)" if intensities is not None else "modes (unit intensities)"
    ax.set(xlabel="wavenumber (cm⁻¹)", ylabel=label, title=f"{title}: harmonic spectrum, {width:g} cm⁻¹ Gaussians")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def calibration(calibrations: dict, path, title: str = "calibration") -> None:
    """RMS force error against mean spread per spread decile, one line per data set (PNG).

    ``calibrations``: ``{label: calibration dict}`` (:func:`equijax.calibration.calibration`).
    """
    fig, ax = _figure(figsize=(5.5, 4.5))
    lo, hi = np.inf, 0.0
    for label, cal in calibrations.items():
        x = [1000 * b["spread"] for b in cal["bins"]]
        y = [1000 * b["rms_error"] for b in cal["bins"]]
        ax.plot(x, y, "o-", label=f"{label}, ρ={cal['spearman']:.2f}")
        lo, hi = min(lo, *x, *y), max(hi, *x, *y)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="error = spread")
    ax.set(xscale="log", yscale="log", xlabel="force spread of the members, decile mean (meV/Å)",
           ylabel="RMS force error in the decile (meV/Å)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def md_log(rows, path, title=""):
    """Energies, temperature and (periodic) pressure against time, one line per replica.

    ``rows``: ``md_log.csv`` rows, in the columns of ``equijax.md.LOG_COLUMNS``.
    """
    data = np.asarray(rows, float)
    periodic = np.isfinite(data[:, 8]).any()
    fig, axes = _figure(3 if periodic else 2, 1, figsize=(7, 7 if periodic else 5), sharex=True)
    for k in np.unique(data[:, 0]).astype(int)[:8]:
        d = data[data[:, 0] == k]
        t = d[:, 2] / 1000.0
        axes[0].plot(t, d[:, 3] - d[0, 3], lw=0.8, color=f"C{k}", label="potential" if k == 0 else None)
        axes[0].plot(t, d[:, 6] - d[0, 3], lw=0.8, ls="--", color=f"C{k}", label="conserved (NVE, NH, NPT: +PV) / total (Langevin)" if k == 0 else None)
        axes[1].plot(t, d[:, 7], lw=0.8, color=f"C{k}")
        if periodic:
            axes[2].plot(t, d[:, 8], lw=0.8, color=f"C{k}")
    axes[0].set_ylabel("energy − E_pot(0) (eV)")
    axes[0].legend(frameon=False)
    axes[1].set_ylabel("temperature (K)")
    if periodic:
        axes[2].set_ylabel("pressure (GPa)")
    axes[-1].set_xlabel("time (ps)")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def band_structure(bs, path, title: str = "") -> None:
    """A phonon band structure (``ase.spectrum.band_structure.BandStructure``, energies in meV)."""
    fig, ax = _figure(figsize=(7, 4))
    bs.plot(ax=ax, emin=min(0.0, float(bs.energies.min()) * 1.1), emax=float(bs.energies.max()) * 1.1,
            ylabel="phonon energy (meV)")
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=120)
