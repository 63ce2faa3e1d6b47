"""The docs are true: every ```python block of README.md and docs/*.md runs as written
(each in a fresh namespace, in a temporary folder; a block that moves a net to "cuda"
runs under --gpu; a block whose first line is a ``# needs: ...`` marker of NEEDS gets what it
needs in its folder first, or is skipped when that is not available: ``# needs: dlib models``),
and every block that says it is an excerpt (a first line ``# from PATH`` or
``/* from PATH */``) is one: its lines appear in PATH, in order."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


EXCERPT = re.compile(r"^(?:# from |/\* from )(\S+?)(?: \*/)?$")


def _blocks():
    runnable, excerpts = [], []
    for path in FILES:
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M):
            line = text[:m.start()].count("\n") + 1
            lang, code = m.group(1), m.group(2)
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            first = code.splitlines()[0] if code.strip() else ""
            ex = EXCERPT.match(first)
            if ex:
                excerpts.append(pytest.param(ex.group(1), code.splitlines()[1:], id=where))
            elif lang == "python":
                marks = [pytest.mark.gpu] if '"cuda"' in code or "'cuda'" in code else []
                runnable.append(pytest.param(code, id=where, marks=marks))
    return runnable, excerpts


BLOCKS, EXCERPTS = _blocks()


@pytest.mark.parametrize("source,lines", EXCERPTS)
def test_doc_excerpt_is_in_its_source(source, lines):
    with open(os.path.join(ROOT, source), encoding="utf-8") as f:
        have = [ln.strip() for ln in f.read().splitlines()]
    pos = 0
    for ln in (ln.strip() for ln in lines):
        if not ln:
            continue
        try:
            pos = have.index(ln, pos) + 1
        except ValueError:
            raise AssertionError(f"{source} has no line {ln!r} (after line {pos})") from None


def test_the_docs_have_examples():
    assert len(BLOCKS) >= 4 and len(EXCERPTS) >= 3


def _dlib_models_here(folder):
    """For a block marked ``# needs: dlib models``: dlib's model files linked into ``folder``,
    with photo.jpg (the astronaut image of their reference outputs) and face_chip.png (its
    aligned 150x150 face); skipped when the model files are not there (MINIDNN_DLIB_MODELS,
    else ../shared/dlib-models)."""
    models = os.environ.get("MINIDNN_DLIB_MODELS") or os.path.join(os.path.dirname(ROOT), "shared",
                                                                   "dlib-models")
    if not os.path.isdir(os.path.join(models, "reference")):
        pytest.skip("needs dlib's model files (set MINIDNN_DLIB_MODELS)")
    import numpy as np
    from PIL import Image
    for name in os.listdir(models):
        if name.endswith(".dat"):
            os.symlink(os.path.join(models, name), os.path.join(folder, name))
    ref = os.path.join(models, "reference")
    Image.fromarray(np.load(os.path.join(ref, "py_cnn_face_detector.npz"))["image_astronaut"]).save(
        os.path.join(folder, "photo.jpg"), quality=95)
    Image.fromarray(np.load(os.path.join(ref, "py_face_recognition_resnet_v1.npz"))["chip150_astronaut"]).save(
        os.path.join(folder, "face_chip.png"))


NEEDS = {"# needs: dlib models": _dlib_models_here}


@pytest.mark.parametrize("code", BLOCKS)
def test_doc_block_runs(code, tmp_path, monkeypatch):
    first = code.splitlines()[0] if code.strip() else ""
    for marker, prepare in NEEDS.items():
        if first.startswith(marker):
            prepare(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
