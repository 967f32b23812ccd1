"""The extension's CMake files list exactly the files that exist (what Slicer's build installs).

Slicer copies only the files a CMakeLists.txt names: a .py or .ui left out works from the
source tree and is missing from the built extension; a name without a file breaks the build.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Engine folders deliberately not installed in Slicer (see MMRegEngine/CMakeLists.txt).
ENGINE_EXCLUDED = ("mmreg/bench/",)


def _strip_comment(line: str) -> str:
    quoted = False
    for i, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == "#" and not quoted:
            return line[:i]
    return line


def cmake_text(path: Path) -> str:
    """The CMake file without comments ('#' outside quotes)."""
    return "\n".join(_strip_comment(line) for line in path.read_text().splitlines())


def cmake_set(text: str, variable: str) -> list:
    """Entries of ``set(variable ...)`` with ``${NAME}`` of earlier one-value ``set``s expanded."""
    singles = dict(re.findall(r"set\((\w+)\s+([^\s\)\"]+)\)", text))
    match = re.search(rf"set\({variable}\s+([^\)]*)\)", text)
    assert match, f"set({variable} ...) not found"
    entries = match.group(1).split()
    return [re.sub(r"\$\{(\w+)\}", lambda m: singles[m.group(1)], e) for e in entries]


def cmake_string(text: str, variable: str) -> str:
    match = re.search(rf'set\({variable}\s+"([^"]*)"\)', text)
    assert match, f"set({variable} \"...\") not found"
    return match.group(1)


def files_under(folder: Path, pattern: str, skip=("__pycache__", "Testing")) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob(pattern)
            if p.is_file() and not any(part in skip for part in p.relative_to(folder).parts)}


def subdirectories() -> list:
    return re.findall(r"add_subdirectory\((\w+)\)", cmake_text(REPO / "CMakeLists.txt"))


def scripted_modules() -> list:
    return [d for d in subdirectories() if "slicerMacroBuildScriptedModule" in cmake_text(REPO / d / "CMakeLists.txt")]


def test_extension_metadata_and_modules():
    text = cmake_text(REPO / "CMakeLists.txt")
    assert re.search(r"project\(MultiModalRegistration\)", text)
    assert cmake_string(text, "EXTENSION_DEPENDS") == "PyTorch"
    assert cmake_string(text, "EXTENSION_CATEGORY") == "Registration"
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert len(cmake_string(text, variable)) > 10
    for folder in subdirectories():
        assert (REPO / folder / "CMakeLists.txt").is_file(), f"add_subdirectory({folder}) has no CMakeLists.txt"
    # Every module folder (<Name>/<Name>.py) is built.
    modules = {p.parent.name for p in REPO.glob("*/*.py") if p.stem == p.parent.name}
    assert modules and modules <= set(scripted_modules()), f"module folders not added: {modules - set(scripted_modules())}"
    assert {"MMRegEngine", "MMRegCommon"} <= set(subdirectories())


@pytest.mark.parametrize("variable,min_size", [("EXTENSION_ICONURL", 64), ("EXTENSION_SCREENSHOTURLS", 300)])
def test_icon_and_screenshot_are_shipped_pngs(variable, min_size):
    urls = cmake_string(cmake_text(REPO / "CMakeLists.txt"), variable).split()  # (screenshots: space-separated)
    assert urls
    for url in urls:
        assert url.startswith("${EXTENSION_RAW_BASE}/"), "URLs point into the repository"
        path = REPO / url.split("}/", 1)[1]
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
        width, height = struct.unpack(">II", data[16:24])
        assert min(width, height) >= min_size


@pytest.mark.parametrize("module", scripted_modules())
def test_module_lists_every_script_and_resource(module):
    folder = REPO / module
    text = cmake_text(folder / "CMakeLists.txt")
    scripts = set(cmake_set(text, "MODULE_PYTHON_SCRIPTS"))
    resources = set(cmake_set(text, "MODULE_PYTHON_RESOURCES"))
    assert scripts == files_under(folder, "*.py"), "MODULE_PYTHON_SCRIPTS differs from the module's .py files"
    assert resources == {f"Resources/{p}" for p in files_under(folder / "Resources", "*")}, \
        "MODULE_PYTHON_RESOURCES differs from the files under Resources/"
    assert f"{module}.py" in scripts and f"Resources/UI/{module}.ui" in resources
    assert f"Resources/Icons/{module}.png" in resources
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text), "self-test not registered"


def test_common_framework_is_listed():
    folder = REPO / "MMRegCommon"
    listed = set(cmake_set(cmake_text(folder / "CMakeLists.txt"), "MMREG_COMMON_PYTHON_SCRIPTS"))
    assert listed == files_under(folder, "*.py")
    assert not files_under(folder, "*") - listed - {"CMakeLists.txt"}, "files in MMRegCommon that are not installed"


def test_engine_is_listed_except_the_benchmark_harness():
    listed = set(cmake_set(cmake_text(REPO / "MMRegEngine" / "CMakeLists.txt"), "MMREG_ENGINE_PYTHON_SCRIPTS"))
    on_disk = {f"{pkg}/{p}" for pkg in ("mmreg", "mmreg_slicer") for p in files_under(REPO / pkg, "*.py")}
    expected = {p for p in on_disk if not p.startswith(ENGINE_EXCLUDED)}
    assert listed == expected, f"missing: {expected - listed}; not on disk: {listed - on_disk}"
    text = (REPO / "MMRegEngine" / "CMakeLists.txt").read_text()
    assert all(excluded in text for excluded in ENGINE_EXCLUDED), "exclusions are explained in the CMake file"


def test_shipped_models_are_installed_with_the_engine():
    listed = set(cmake_set(cmake_text(REPO / "MMRegEngine" / "CMakeLists.txt"), "MMREG_SHIPPED_MODEL_FILES"))
    models = REPO / "Resources" / "Models"
    on_disk = {f"Resources/Models/{p}" for p in files_under(models, "*")} if models.is_dir() else set()
    assert listed == on_disk, f"missing: {on_disk - listed}; not on disk: {listed - on_disk}"
    for card in (p for p in on_disk if p.endswith("/model.json")):  # each card has its weights
        assert card.replace("model.json", "model.pt") in on_disk


def test_demo_sample_is_installed_for_the_self_tests():
    """MMRegCommonLib.testing.sample_folder() looks for the demo sample beside the engine; the module whose
    self-test uses it installs every sample image and the licence (not the script that regenerates it)."""
    listed = set()
    for module in scripted_modules():
        text = cmake_text(REPO / module / "CMakeLists.txt")
        if "MMREG_SAMPLE_FILES" in text:
            listed |= set(cmake_set(text, "MMREG_SAMPLE_FILES"))
    assert listed, "no module installs Resources/Sample (the MultiscaleRegistration self-test uses it)"
    on_disk = {f"Resources/Sample/{p}" for p in files_under(REPO / "Resources" / "Sample", "*")}
    assert listed == on_disk - {"Resources/Sample/make_sample.py"}, f"missing: {on_disk - listed}"
