"""The CUDA kernels' sources: where they are, the text PyCUDA compiles, each kernel's arguments.

WHAT THIS MODULE REPRESENTS
    The GPU-free half of kernel loading (kernels.py compiles what it assembles):

    - ``kernel_root()``: the folder holding ``cuda/`` (kernels/cuda/*.cu, *.cuh)
      and ``common/`` (kernels/common/*.h, shared with the CPU kernels). An
      installed package has them as minidnn/kernels/ (CMakeLists.txt installs
      both); a source checkout (an editable install too) as kernels/ beside
      minidnn/. Both folders always come from the same root.
    - ``assemble(family)``: the text of kernels/cuda/<family>.cu with every
      ``#include "name"`` of ours (looked up beside the including file, then in
      common/) replaced by that file's text, each file once, between ``#line``
      directives so that nvcc's messages name the real file and line. PyCUDA's
      disk cache keys on the source text; with an ``#include`` left in it, it
      would run ``nvcc --preprocess`` at every load to compute the key.
    - ``signature(family, kernel)``: a kernel's parameters, parsed from its
      ``extern "C" __global__`` declaration (object-like macros such as
      conv.cu's CONV_ARGS expanded), and ``.format``, the argument format of
      PyCUDA's prepared calls ("PPPPPPiiii..."): derived from the C source, so
      it cannot disagree with it.
    - ``act_count()``: MDNN_ACT_COUNT of activations.h (codes 0 .. count-1).

    No PyCUDA and no package-relative imports: it runs by path, as a check that
    compiles what PyCUDA would compile, with the same options and include path:

        python minidnn/backends/cuda/source.py [--nvcc] [--arch sm_90] [--keep DIR] [FAMILY ...]

    lists each family's kernels and argument formats; with --nvcc it runs
    ``nvcc --cubin -arch ARCH <NVCC_OPTIONS> -I<cuda> -I<common> kernel.cu`` on
    each assembled source (with --resource-usage) and fails if any fails.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import NamedTuple

FAMILIES = ("conv", "gemm", "pool", "eltwise", "softmax", "conv_family", "image", "tensor")
NVCC_OPTIONS = ("-O3",)          # what kernels.py gives SourceModule (besides -arch and -I)


# --------------------------------------------------------------------------- where
def _roots():
    here = Path(__file__).resolve()
    return (here.parents[2] / "kernels",      # installed: minidnn/kernels/{cuda,common}
            here.parents[3] / "kernels")      # source checkout: kernels/ beside minidnn/


@functools.lru_cache(maxsize=None)
def kernel_root() -> Path:
    """The folder with cuda/ and common/ (see the module docstring); RuntimeError if none."""
    for root in _roots():
        if (root / "cuda" / "conv.cu").is_file() and (root / "common" / "activations.h").is_file():
            return root
    raise RuntimeError(
        "minidnn's CUDA backend cannot find its kernels (minidnn/kernels/cuda and "
        "minidnn/kernels/common in the installed package, or kernels/ in the source tree; "
        f"looked in {', '.join(str(r) for r in _roots())}); reinstall minidnn")


def include_dirs():
    """The include path of the kernels: [kernels/cuda, kernels/common]."""
    root = kernel_root()
    return [str(root / "cuda"), str(root / "common")]


# --------------------------------------------------------------------------- what
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"\n]+)"[ \t]*(?://.*)?$', re.M)


def _find_include(name, including_dir):
    for d in (including_dir, *map(Path, include_dirs())):
        p = d / name
        if p.is_file():
            return p.resolve()
    raise RuntimeError(f'minidnn cuda: #include "{name}" (from {including_dir}) is neither '
                       f"beside the including file nor in {include_dirs()}")


def _inline(path: Path, seen: set) -> str:
    text = path.read_text()
    out, pos = [], 0
    for m in _INCLUDE.finditer(text):
        out.append(text[pos:m.start()])
        inc = _find_include(m.group(1), path.parent)
        line_after = text.count("\n", 0, m.end()) + 2       # the line after the #include
        if inc not in seen:
            seen.add(inc)
            out.append(f'#line 1 "{inc}"\n{_inline(inc, seen)}\n#line {line_after} "{path}"')
        else:
            out.append(f"// (already included: {inc.name})")
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


@functools.lru_cache(maxsize=None)
def assemble(family: str) -> str:
    """The source PyCUDA compiles for kernels/cuda/<family>.cu: our #includes inlined."""
    path = (kernel_root() / "cuda" / f"{family}.cu").resolve()
    if not path.is_file():
        raise RuntimeError(f"minidnn cuda: no kernel family {family!r} ({path} is missing)")
    return f'#line 1 "{path}"\n' + _inline(path, {path})


# --------------------------------------------------------------------------- kernel arguments
class Signature(NamedTuple):
    """A kernel's parameters: ``names`` and ``format`` (one struct character each:
    P pointer, i int, I unsigned, q long long, Q unsigned long long, f float, d double)."""
    kernel: str
    names: tuple
    format: str

    def describe(self):
        return f"{self.kernel}({', '.join(f'{n}:{c}' for n, c in zip(self.names, self.format))})"


_SCALARS = {
    "int": "i", "signed": "i", "signed int": "i", "unsigned": "I", "unsigned int": "I",
    "long long": "q", "long long int": "q", "signed long long": "q",
    "unsigned long long": "Q", "unsigned long long int": "Q",
    "long": "l", "long int": "l", "unsigned long": "L", "size_t": "Q",
    "short": "h", "unsigned short": "H", "char": "b", "signed char": "b", "unsigned char": "B",
    "bool": "?", "float": "f", "double": "d",
}
_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict", "restrict"}
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+'
                     r'(?:__launch_bounds__\s*\([^()]*\)\s*)?(\w+)\s*\(([^()]*)\)')
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(?![\w(])[ \t]*(.*)$", re.M)


def _strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _param_char(kernel, decl):
    words = [w for w in re.findall(r"[A-Za-z_]\w*|\*", decl) if w not in _QUALIFIERS]
    if len(words) < 2:
        raise ValueError(f"minidnn cuda: cannot read parameter {decl.strip()!r} of kernel {kernel}")
    name, ctype = words[-1], words[:-1]
    if "*" in ctype:
        return name, "P"
    char = _SCALARS.get(" ".join(ctype))
    if char is None:
        raise ValueError(f"minidnn cuda: kernel {kernel}: parameter {name} has type "
                         f"{' '.join(ctype)!r}, which source.py cannot pass (add it to _SCALARS)")
    return name, char


def parse_signatures(text: str) -> dict:
    """{kernel name: Signature} for every extern "C" __global__ kernel of CUDA source text."""
    text = _strip_comments(text).replace("\\\n", " ")
    macros = {m.group(1): m.group(2) for m in _DEFINE.finditer(text)}
    word = re.compile(r"\b(" + "|".join(map(re.escape, macros)) + r")\b") if macros else None
    out = {}
    for m in _KERNEL.finditer(text):
        kernel, params = m.group(1), m.group(2)
        for _ in range(8):                       # object-like macros, nested a few deep
            if word is None:
                break
            expanded = word.sub(lambda w: macros[w.group(1)], params)
            if expanded == params:
                break
            params = expanded
        decls = [d for d in params.split(",") if d.strip() and d.strip() != "void"]
        names, chars = zip(*(_param_char(kernel, d) for d in decls)) if decls else ((), ())
        out[kernel] = Signature(kernel, tuple(names), "".join(chars))
    return out


@functools.lru_cache(maxsize=None)
def signatures(family: str) -> dict:
    """{kernel name: Signature} of kernels/cuda/<family>.cu."""
    return parse_signatures(assemble(family))


def signature(family: str, kernel: str) -> Signature:
    """The Signature of one kernel; KeyError naming what the family has when it is not there."""
    sigs = signatures(family)
    if kernel not in sigs:
        raise KeyError(f"minidnn cuda: {family}.cu has no kernel {kernel!r} "
                       f"(it has {', '.join(sorted(sigs))})")
    return sigs[kernel]


@functools.lru_cache(maxsize=None)
def act_count() -> int:
    """MDNN_ACT_COUNT of kernels/common/activations.h: valid codes are 0 .. count-1."""
    text = (kernel_root() / "common" / "activations.h").read_text()
    m = re.search(r"^#define\s+MDNN_ACT_COUNT\s+(\d+)", text, re.M)
    if m is None:
        raise RuntimeError("minidnn cuda: activations.h defines no MDNN_ACT_COUNT")
    return int(m.group(1))


# --------------------------------------------------------------------------- the check
def _main(argv=None):
    import argparse
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    ap = argparse.ArgumentParser(description="List (and with --nvcc compile) the CUDA kernels "
                                 "exactly as the CUDA backend hands them to PyCUDA.")
    ap.add_argument("families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--nvcc", action="store_true", help="compile each family with nvcc")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--keep", help="write each assembled source to DIR/<family>.cu")
    a = ap.parse_args(argv)
    print(f"kernels: {kernel_root()}")
    failed = []
    for fam in a.families:
        src = assemble(fam)
        print(f"\n{fam}.cu: {len(src.splitlines())} lines assembled")
        for sig in signatures(fam).values():
            print(f"  {sig.kernel:16s} {sig.format:24s} {', '.join(sig.names)}")
        if a.keep:
            Path(a.keep).mkdir(parents=True, exist_ok=True)
            (Path(a.keep) / f"{fam}.cu").write_text(src)
        if not a.nvcc:
            continue
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            print("nvcc is not on PATH", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "kernel.cu").write_text(src)         # PyCUDA's file name, in its own dir
            cmd = [nvcc, "--cubin", "-arch", a.arch, *NVCC_OPTIONS,
                   *(f"-I{i}" for i in include_dirs()), "--resource-usage", "kernel.cu"]
            t = time.perf_counter()
            r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
            dt = time.perf_counter() - t
            out = (r.stdout + r.stderr).strip()
            if r.returncode != 0 or not (Path(d) / "kernel.cubin").is_file():
                failed.append(fam)
                print(f"  nvcc FAILED ({' '.join(cmd)}):\n{out}")
                continue
            print(f"  nvcc ok in {dt:.1f} s")
            for ln in out.splitlines():
                ln = ln.replace("ptxas info    : ", "")
                if ln.startswith(("Used", "Function properties")) or "spill" in ln:
                    print("    " + ln.strip())
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
