"""Library discovery: finding, loading and describing libcudnn (once, at the first ``load()``).

Where it is looked for, in order (``candidates()``):
  1. ``MINIDNN_CUDNN=0`` turns cuDNN off;
  2. ``MINIDNN_CUDNN_PATH`` names the file to load (nothing else is tried);
  3. the lib folder of an installed nvidia-cudnn-cu13 / nvidia-cudnn-cu12 wheel
     (found through importlib.metadata, then the ``nvidia`` namespace package);
  4. the system's library path (libcudnn.so.9, .so.8, .so).
The sub-libraries beside a libcudnn.so found by path (libcudnn_graph,
libcudnn_ops, libcudnn_cnn ...) are loaded first, from that same folder, so
that two cuDNN builds on one machine never mix.

``_state`` holds what was loaded: lib (the ctypes library, its functions bound
by bindings.bind), path, version, origin, the sub-libraries, or the reason it
is unavailable. Importing this module needs neither a GPU nor PyCUDA.
"""
import ctypes
import ctypes.util
import glob
import os

from .policy import version_text

class CudnnError(RuntimeError):
    """A cuDNN call failed: ``call`` (the function), ``code`` and ``name`` (its status)."""

    def __init__(self, call, code, name, detail=""):
        self.call, self.code, self.name = call, code, name
        super().__init__(f"cuDNN {call} failed: CUDNN_STATUS_{name} ({code})"
                         + (f": {detail}" if detail else ""))


_SUBLIBS = ("graph", "engines_precompiled", "engines_runtime_compiled", "heuristic", "ops", "cnn")
_state = {"loaded": False, "lib": None, "path": None, "version": None, "reason": None,
          "sublibs": []}


def candidates():
    """Where the library is looked for, in order: [(path or soname, origin)]."""
    if os.environ.get("MINIDNN_CUDNN", "1").strip().lower() in ("0", "off", "false", "no"):
        return []
    explicit = os.environ.get("MINIDNN_CUDNN_PATH")
    if explicit:
        return [(explicit, "MINIDNN_CUDNN_PATH")]
    out, seen = [], set()

    def add(path, origin):
        real = os.path.realpath(path)
        if real not in seen and os.path.isfile(path):
            seen.add(real)
            out.append((path, origin))

    try:
        from importlib import metadata
        for dist in ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
            try:
                files = metadata.distribution(dist).files or ()
            except metadata.PackageNotFoundError:
                continue
            for f in files:
                s = str(f)
                if "/lib/libcudnn.so" in s and os.path.basename(s).count(".so.") == 1:
                    add(str(f.locate()), dist)
    except Exception:  # a broken metadata entry must not stop the search
        pass
    try:
        import importlib.util
        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or ()) if spec else ():
            for p in sorted(glob.glob(os.path.join(root, "cudnn", "lib", "libcudnn.so.*")),
                            reverse=True):
                add(p, "nvidia.cudnn")
    except Exception:
        pass
    for soname in ("libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"):
        out.append((soname, "system"))
    found = ctypes.util.find_library("cudnn")
    if found and found not in [c[0] for c in out]:
        out.append((found, "system"))
    return out


def _load_from(path):
    """dlopen libcudnn at ``path`` (preloading its sub-libraries from the same folder)."""
    mode = getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 2)
    sublibs = []
    if os.path.sep in path:
        folder = os.path.dirname(os.path.realpath(path))
        for name in _SUBLIBS:
            for sub in sorted(glob.glob(os.path.join(folder, f"libcudnn_{name}.so.*"))):
                try:
                    ctypes.CDLL(sub, mode=mode)
                    sublibs.append(sub)
                except OSError:
                    pass
                break
    lib = ctypes.CDLL(path, mode=mode)
    return lib, sublibs


def load():
    """Load libcudnn once; return the ctypes library or None (``unavailable_reason()`` says why)."""
    st = _state
    if st["loaded"]:
        return st["lib"]
    st["loaded"] = True
    cands = candidates()
    if not cands:
        st["reason"] = "turned off by MINIDNN_CUDNN=0"
        return None
    errors = []
    for path, origin in cands:
        try:
            lib, sublibs = _load_from(path)
            lib.cudnnGetVersion.restype = ctypes.c_size_t
            v = int(lib.cudnnGetVersion())
        except (OSError, AttributeError) as e:
            errors.append(f"{path} ({origin}): {e}")
            if origin == "MINIDNN_CUDNN_PATH":
                break
            continue
        from .bindings import bind   # (bindings needs this module's _state)
        bind(lib, v)
        st.update(lib=lib, path=_real_path(lib, path), version=v, sublibs=sublibs,
                  origin=origin)
        return lib
    if cands[0][1] == "MINIDNN_CUDNN_PATH":
        st["reason"] = f"MINIDNN_CUDNN_PATH cannot be loaded: {errors[0]}"
    else:
        st["reason"] = ("libcudnn not found (tried " + ", ".join(c[0] for c in cands) +
                        "); pip install 'minidnn[cudnn]', or set MINIDNN_CUDNN_PATH")
    return None


def _real_path(lib, fallback):
    """The file the dynamic loader actually opened for ``lib``."""
    try:
        dl = ctypes.CDLL(None)

        class DlInfo(ctypes.Structure):
            _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                        ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]
        info = DlInfo()
        addr = ctypes.cast(lib.cudnnGetVersion, ctypes.c_void_p)
        if dl.dladdr(addr, ctypes.byref(info)) and info.fname:
            return os.path.realpath(info.fname.decode())
    except Exception:
        pass
    return fallback


def available():
    """True when cuDNN can be used: not turned off, libcudnn loaded, PyCUDA importable."""
    if load() is None:
        return False
    try:
        import pycuda.driver  # noqa: F401  (the check itself)
    except Exception as e:
        _state["reason"] = f"PyCUDA cannot be imported ({e}); pip install 'minidnn[cudnn]'"
        return False
    return True


def version():
    """cudnnGetVersion() of the loaded library, or None."""
    load()
    return _state["version"]


def version_string():
    """The decoded version ("9.19.0"), or None."""
    v = version()
    return None if v is None else version_text(v)


def library_path():
    """The file of the loaded libcudnn, or None."""
    load()
    return _state["path"]


def unavailable_reason():
    """Why ``available()`` is False (None when it is True)."""
    return None if available() else _state["reason"]
