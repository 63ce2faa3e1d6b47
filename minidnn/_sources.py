"""Running from a source checkout: find the compiled kernels, and refuse stale ones.

``python -m pytest`` or ``python -m minidnn`` in the repository root imports this
package from the checkout, which holds no compiled kernels; the ones ``pip
install`` built live in the installed copy (``find_installed_kernels`` adds its
folder to the package's search path). Every extension module is stamped at
build time with a hash of the kernel sources it was built from (CMakeLists.txt);
``check_fresh`` compares it with the checkout's sources, so an edited .pyx or
header can never silently run the old code: it raises ImportError saying how
to rebuild. MINIDNN_ALLOW_STALE_KERNELS=1 skips the check (at your own risk).
"""
import hashlib
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNEL_DIRS = ("kernels/cpu", "kernels/common")


def source_tree():
    """The root of the source checkout this package is imported from, or None."""
    root = os.path.dirname(_HERE)
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and \
            os.path.isdir(os.path.join(root, "kernels", "cpu")):
        return root
    return None


def kernel_hash(root):
    """The hash CMakeLists.txt stamps into the extensions, of the sources under ``root``."""
    rels = []
    for d in _KERNEL_DIRS:
        for folder, _, files in os.walk(os.path.join(root, d)):
            for f in files:
                rels.append(os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/"))
    manifest = ""
    for rel in sorted(rels):
        with open(os.path.join(root, rel), "rb") as fh:
            manifest += f"{rel}:{hashlib.sha256(fh.read()).hexdigest()}\n"
    return hashlib.sha256(manifest.encode()).hexdigest()


def find_installed_kernels(package_path):
    """From a source checkout, add the installed package's folder (which holds the
    compiled kernels) to ``package_path`` (the package's ``__path__``)."""
    if any(f.startswith("_cpu_") for f in os.listdir(_HERE)):
        return
    try:
        from importlib.metadata import distribution
        installed = str(distribution("minidnn").locate_file("minidnn"))
    except Exception:
        return
    if os.path.isdir(installed) and os.path.realpath(installed) != os.path.realpath(_HERE):
        package_path.append(installed)


def check_fresh(*modules):
    """ImportError when a compiled module was built from other kernel sources than the
    checkout's (no check outside a source checkout)."""
    root = source_tree()
    if root is None or os.environ.get("MINIDNN_ALLOW_STALE_KERNELS") == "1":
        return
    want = kernel_hash(root)
    for m in modules:
        got = m._source_hash()
        if got != want:
            raise ImportError(
                f"minidnn: the compiled CPU kernels ({os.path.basename(m.__file__)}) were built from "
                f"other sources than this checkout's kernels/ (edited since the last build): rebuild "
                f"them with `pip install --no-build-isolation -e .` (or `pip install .`) in {root}")
