"""Stage 2 of the band eigensolver: eigenvalues of a symmetric band matrix by LAPACK, GIL released.

Split from `svd_probe.spectra.band` so that it imports no torch: the band solver's worker
processes (`band.py`, "Stage 2's workers") import only this module, numpy and scipy. Why ctypes
and which LAPACK routine: see band.py's docstring.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

_P = ctypes.c_void_p
_L = ctypes.c_size_t  # gfortran's hidden lengths of the character arguments


def _int_ref(v: int):  # noqa: ANN202 - a ctypes byref
    """A Fortran INTEGER argument: a reference to a C int holding v."""
    return ctypes.byref(ctypes.c_int(v))


def _cython_lapack_pointer(name: str) -> int | None:
    """The C function pointer that scipy.linalg.cython_lapack publishes for LAPACK routine `name`."""
    import scipy.linalg.cython_lapack as cl

    capsule = cl.__pyx_capi__.get(name)
    if capsule is None:
        return None
    # prototypes of our own: setting argtypes on ctypes.pythonapi's functions would change them
    # for every other user in the process
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    get_pointer = ctypes.PYFUNCTYPE(_P, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", ctypes.pythonapi))
    return get_pointer(capsule, get_name(capsule)) or None


def _scipy_lapack_symbol(name: str) -> int | None:
    """The address of Fortran LAPACK routine `name` in the LAPACK that scipy.linalg is linked
    against (32-bit integers), for routines that cython_lapack does not publish (dsbev_2stage).

    dlsym on the handle of scipy's cython_lapack module searches it and the libraries it links
    (scipy's bundled OpenBLAS prefixes its symbols with "scipy_"; a system LAPACK does not)."""
    import scipy.linalg.cython_lapack as cl

    try:
        lib = ctypes.CDLL(cl.__file__)
    except OSError:
        return None
    for symbol in (f"scipy_{name}_", f"{name}_", f"scipy_{name}", name):
        try:
            return ctypes.cast(getattr(lib, symbol), _P).value
        except AttributeError:
            continue
    return None


def _band_routes() -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """[(name, fn)] in order of preference, those that load here; fn(ab) → eigenvalues ascending
    of the band matrix in lower band storage ab."""
    routes: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = []
    ip = _int_ref
    try:
        two_ptr = _scipy_lapack_symbol("dsbev_2stage")
        bevd_ptr = _cython_lapack_pointer("dsbevd")
    except Exception:  # noqa: BLE001 - any failure here only means: scipy's wrapper instead
        two_ptr = bevd_ptr = None
    if two_ptr:
        fn2 = ctypes.CFUNCTYPE(None, *([_P] * 12), _L, _L)(two_ptr)

        def run2(ab: np.ndarray) -> np.ndarray:
            kd, n = ab.shape[0] - 1, ab.shape[1]
            a = np.array(ab, dtype=np.float64, order="F")  # overwritten
            w, z, q, info = np.empty(n), np.empty(1), np.empty(1), ctypes.c_int(0)
            args = (ip(n), ip(kd), a.ctypes.data, ip(kd + 1), w.ctypes.data, z.ctypes.data, ip(1))
            fn2(b"N", b"L", *args, q.ctypes.data, ip(-1), ctypes.byref(info), 1, 1)  # workspace query
            work = np.empty(max(1, int(q[0])))
            fn2(b"N", b"L", *args, work.ctypes.data, ip(work.size), ctypes.byref(info), 1, 1)
            if info.value != 0:
                raise np.linalg.LinAlgError(f"dsbev_2stage: info {info.value}")
            return w

        routes.append(("LAPACK dsbev_2stage (dsytrd_sb2st + dsterf)", run2))
    if bevd_ptr:
        fnd = ctypes.CFUNCTYPE(None, *([_P] * 14))(bevd_ptr)  # a C wrapper: no hidden lengths

        def rund(ab: np.ndarray) -> np.ndarray:
            kd, n = ab.shape[0] - 1, ab.shape[1]
            a = np.array(ab, dtype=np.float64, order="F")
            w, z, work, iwork, info = np.empty(n), np.empty(1), np.empty(2 * n), np.empty(1, np.int32), ctypes.c_int(0)
            fnd(b"N", b"L", ip(n), ip(kd), a.ctypes.data, ip(kd + 1), w.ctypes.data, z.ctypes.data, ip(1),
                work.ctypes.data, ip(2 * n), iwork.ctypes.data, ip(1), ctypes.byref(info))  # fmt: skip
            if info.value != 0:
                raise np.linalg.LinAlgError(f"dsbevd: info {info.value}")
            return w

        routes.append(("LAPACK dsbevd (dsbtrd + dsterf)", rund))

    def run_scipy(ab: np.ndarray) -> np.ndarray:
        import scipy.linalg

        return scipy.linalg.eigvals_banded(ab, lower=True)

    routes.append(("scipy.linalg.eigvals_banded (holds the GIL)", run_scipy))
    return routes


@functools.cache
def _stage2() -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    return _band_routes()[0]


def band_eigvals(ab: np.ndarray) -> np.ndarray:
    """Eigenvalues, ascending, of the symmetric band matrix in LAPACK lower band storage ab [b + 1, n]."""
    if ab.shape[1] == 0:
        return np.empty(0)
    return _stage2()[1](ab)


@functools.cache
def _sb2st() -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """dsytrd_sb2st (band → tridiagonal by bulge chasing, no vectors) where scipy's LAPACK
    exports it, else None."""
    try:
        ptr = _scipy_lapack_symbol("dsytrd_sb2st")
    except Exception:  # noqa: BLE001 - any failure here only means: not offered
        ptr = None
    if not ptr:
        return None
    fn = ctypes.CFUNCTYPE(None, *([_P] * 14), _L, _L, _L)(ptr)
    ip = _int_ref

    def run(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kd, n = ab.shape[0] - 1, ab.shape[1]
        a = np.array(ab, dtype=np.float64, order="F")  # overwritten
        d, e, q, info = np.empty(n), np.empty(max(n - 1, 1)), np.empty(2), ctypes.c_int(0)
        args = (ip(n), ip(kd), a.ctypes.data, ip(kd + 1), d.ctypes.data, e.ctypes.data)
        # STAGE1 = "N": ab is a band matrix of our own (not dsytrd_sy2sb's output), VECT = "N"
        fn(b"N", b"N", b"L", *args, q.ctypes.data, ip(-1), q[1:].ctypes.data, ip(-1), ctypes.byref(info), 1, 1, 1)
        hous, work = np.empty(max(1, int(q[0]))), np.empty(max(1, int(q[1])))
        fn(b"N", b"N", b"L", *args, hous.ctypes.data, ip(hous.size), work.ctypes.data, ip(work.size),
           ctypes.byref(info), 1, 1, 1)  # fmt: skip
        if info.value != 0:
            raise np.linalg.LinAlgError(f"dsytrd_sb2st: info {info.value}")
        return d, e[: n - 1]

    return run


def has_band_tridiagonal() -> bool:
    """Whether `band_tridiagonal` can run here (scipy's LAPACK exports dsytrd_sb2st)."""
    return _sb2st() is not None


def band_tridiagonal(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tridiagonal form (diagonal d [n], off-diagonal e [n-1]) similar to the symmetric band
    matrix in LAPACK lower band storage ab [b + 1, n]: stage 2 without its last step (dsterf),
    whose eigenvalues `svd_probe.spectra.sturm` finds on the GPU."""
    run = _sb2st()
    if run is None:
        raise RuntimeError("dsytrd_sb2st is not in scipy's LAPACK here")
    return run(ab)


def stage2_name() -> str:
    """Which LAPACK routine `band_eigvals` calls here."""
    return _stage2()[0]
