"""Checks of the Slicer extension packaging, by reading the files (no Slicer build needed).

The CMake files cannot be configured here (slicer-core-sdk has no UseSlicer.cmake), so they are
parsed as text: extension metadata, the explicit file lists of SAMSegment/CMakeLists.txt against
the working tree, icons, license, catalog entry and requirements.

Run as a script to print the CMake file lists that match the working tree:

    python Testing/SAMSegmentSlicer/test_packaging.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR_NAME = "SAMSegment"
LIB_DIR_NAME = "SAMSegmentLib"

# set() variables of SAMSegment/CMakeLists.txt that hold files, and where they must point.
MODULE_LISTS = ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES")
LIB_LISTS = ("SAMSegmentLib_PYTHON_SCRIPTS", "SAMSegmentLib_PYTHON_RESOURCES")

REQUIRED_EXTENSION_VARIABLES = (
    "EXTENSION_HOMEPAGE",
    "EXTENSION_CATEGORY",
    "EXTENSION_CONTRIBUTORS",
    "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL",
    "EXTENSION_SCREENSHOTURLS",
    "EXTENSION_DEPENDS",
)

# Properties allowed by slicer-extension-catalog-entry-schema-v1.0.1 ("additionalProperties": false).
CATALOG_PROPERTIES = {
    "$schema",
    "category",
    "scm_url",
    "scm_revision",
    "scm_type",
    "build_dependencies",
    "build_subdirectory",
    "enabled",
    "tier",
}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}

# Files that are never packaged.
IGNORED_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache"}
IGNORED_SUFFIXES = (".pyc", ".pyo", "~", ".swp", ".orig", ".rej")


# --------------------------------------------------------------------------------------------
# A small CMake reader: commands, arguments (quoted or not), comments, ${VAR} expansion.
# --------------------------------------------------------------------------------------------


@dataclass
class CMakeCommand:
    name: str  # lower case
    args: list[str]
    line: int


def parse_cmake(text: str) -> list[CMakeCommand]:
    """Split CMake source into commands with their arguments.

    Handles line comments, quoted arguments (with backslash escapes, may contain parentheses)
    and nested unquoted parentheses. Enough for declarative extension files.
    """
    commands: list[CMakeCommand] = []
    i, n, line = 0, len(text), 1
    ident = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        else:
            m = ident.match(text, i)
            if not m:
                raise ValueError(f"line {line}: unexpected character {c!r}")
            name, start_line = m.group(0).lower(), line
            i = m.end()
            while i < n and text[i] in " \t":
                i += 1
            if i >= n or text[i] != "(":
                raise ValueError(f"line {line}: expected '(' after {name}")
            i += 1
            args: list[str] = []
            depth, cur, in_arg = 1, [], False
            while True:
                if i >= n:
                    raise ValueError(f"line {start_line}: unterminated {name}(")
                c = text[i]
                if c == '"':
                    i += 1
                    buf = []
                    while i < n and text[i] != '"':
                        if text[i] == "\\" and i + 1 < n:
                            buf.append(text[i + 1])
                            i += 2
                            continue
                        if text[i] == "\n":
                            line += 1
                        buf.append(text[i])
                        i += 1
                    i += 1
                    cur.append("".join(buf))
                    in_arg = True
                    continue
                if c == "#" and not in_arg:
                    while i < n and text[i] != "\n":
                        i += 1
                    continue
                if c.isspace() or (c == ")" and depth == 1):
                    if in_arg:
                        args.append("".join(cur))
                        cur, in_arg = [], False
                    if c == "\n":
                        line += 1
                    i += 1
                    if c == ")":
                        break
                    continue
                if c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                cur.append(c)
                in_arg = True
                i += 1
            commands.append(CMakeCommand(name, args, start_line))
    return commands


def cmake_set_variables(commands: list[CMakeCommand]) -> dict[str, list[str]]:
    """Values of plain set(NAME v1 v2 ...) commands, with ${VAR} expanded from earlier sets."""
    variables: dict[str, list[str]] = {}
    for cmd in commands:
        if cmd.name != "set" or not cmd.args:
            continue
        name, values = cmd.args[0], cmd.args[1:]
        if "CACHE" in values:
            values = values[: values.index("CACHE")]
        if "PARENT_SCOPE" in values:
            values = values[: values.index("PARENT_SCOPE")]
        variables[name] = [expand(v, variables) for v in values]
    return variables


def expand(value: str, variables: dict[str, list[str]]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        return ";".join(variables[name]) if name in variables else m.group(0)

    return re.sub(r"\$\{([A-Za-z0-9_]+)\}", repl, value)


def read_cmake(path: Path) -> tuple[list[CMakeCommand], dict[str, list[str]]]:
    commands = parse_cmake(path.read_text(encoding="utf-8"))
    return commands, cmake_set_variables(commands)


def find_commands(commands: list[CMakeCommand], name: str) -> list[CMakeCommand]:
    return [c for c in commands if c.name == name.lower()]


# --------------------------------------------------------------------------------------------
# The reusable checker: files in the tree vs files listed in SAMSegment/CMakeLists.txt.
# --------------------------------------------------------------------------------------------


@dataclass
class ListingReport:
    unlisted: list[str] = field(default_factory=list)  # in the tree, not in CMake
    missing: list[str] = field(default_factory=list)  # in CMake, not in the tree
    misplaced: list[str] = field(default_factory=list)  # in the wrong list (module vs lib)
    duplicates: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unlisted or self.missing or self.misplaced or self.duplicates)

    def __str__(self) -> str:
        parts = []
        for label in ("unlisted", "missing", "misplaced", "duplicates"):
            items = getattr(self, label)
            if items:
                parts.append(f"{label}: " + ", ".join(items))
        return "; ".join(parts) or "ok"


def _packaged(path: Path, base: Path) -> bool:
    rel = path.relative_to(base)
    if any(part in IGNORED_DIRS or part.startswith(".") for part in rel.parts):
        return False
    return path.is_file() and not path.name.endswith(IGNORED_SUFFIXES)


def expected_package_files(root: Path) -> set[str]:
    """Repository-relative POSIX paths that the extension must ship.

    - every *.py under SAMSegment/ (the module, SAMSegmentSlicer/, anything added later);
    - every file under SAMSegment/Resources/ (icons, UI, requirements) except translations;
    - every file under SAMSegmentLib/ (code, models.json, sample_data/*).
    """
    module_dir, lib_dir = root / MODULE_DIR_NAME, root / LIB_DIR_NAME
    out: set[str] = set()
    if module_dir.is_dir():
        for p in module_dir.rglob("*.py"):
            if _packaged(p, root):
                out.add(p.relative_to(root).as_posix())
        resources = module_dir / "Resources"
        if resources.is_dir():
            for p in resources.rglob("*"):
                if _packaged(p, root) and "Translations" not in p.relative_to(resources).parts:
                    out.add(p.relative_to(root).as_posix())
    if lib_dir.is_dir():
        for p in lib_dir.rglob("*"):
            if _packaged(p, root):
                out.add(p.relative_to(root).as_posix())
    return out


def listed_package_files(root: Path, cmake_text: str | None = None) -> dict[str, list[str]]:
    """File lists of SAMSegment/CMakeLists.txt as repository-relative POSIX paths, per variable."""
    module_dir = root / MODULE_DIR_NAME
    if cmake_text is None:
        cmake_text = (module_dir / "CMakeLists.txt").read_text(encoding="utf-8")
    variables = cmake_set_variables(parse_cmake(cmake_text))
    lists: dict[str, list[str]] = {}
    for name in MODULE_LISTS + LIB_LISTS:
        entries = []
        for value in variables.get(name, []):
            for item in value.split(";"):
                if item:
                    rel = os.path.normpath(os.path.join(MODULE_DIR_NAME, item))
                    entries.append(Path(rel).as_posix())
        lists[name] = entries
    return lists


def check_cmake_listing(root: Path = REPO, cmake_text: str | None = None) -> ListingReport:
    """Compare the working tree under `root` with the lists in SAMSegment/CMakeLists.txt."""
    lists = listed_package_files(root, cmake_text)
    report = ListingReport()
    all_listed: list[str] = [p for entries in lists.values() for p in entries]
    seen: set[str] = set()
    for p in all_listed:
        if p in seen and p not in report.duplicates:
            report.duplicates.append(p)
        seen.add(p)
    for name, entries in lists.items():
        prefix = (MODULE_DIR_NAME if name in MODULE_LISTS else LIB_DIR_NAME) + "/"
        report.misplaced += [f"{p} (in {name})" for p in entries if not p.startswith(prefix)]
    report.missing = sorted(p for p in seen if not (root / p).is_file())
    report.unlisted = sorted(expected_package_files(root) - seen)
    return report


def suggested_cmake_lists(root: Path = REPO) -> str:
    """set() blocks for SAMSegment/CMakeLists.txt that list exactly the files in the tree."""
    files = sorted(expected_package_files(root))
    module = [f[len(MODULE_DIR_NAME) + 1 :] for f in files if f.startswith(MODULE_DIR_NAME + "/")]
    lib = ["../" + f for f in files if f.startswith(LIB_DIR_NAME + "/")]
    blocks = {
        "MODULE_PYTHON_SCRIPTS": [f for f in module if f.endswith(".py")],
        "MODULE_PYTHON_RESOURCES": [f for f in module if not f.endswith(".py")],
        "SAMSegmentLib_PYTHON_SCRIPTS": [f for f in lib if f.endswith(".py")],
        "SAMSegmentLib_PYTHON_RESOURCES": [f for f in lib if not f.endswith(".py")],
    }
    text = []
    for name, entries in blocks.items():
        text.append(f"set({name}\n" + "".join(f"  {e}\n" for e in entries) + "  )\n")
    return "\n".join(text)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def top_cmake():
    return read_cmake(REPO / "CMakeLists.txt")


@pytest.fixture(scope="module")
def module_cmake():
    return read_cmake(REPO / MODULE_DIR_NAME / "CMakeLists.txt")


def test_cmake_files_parse():
    for path in (REPO / "CMakeLists.txt", REPO / MODULE_DIR_NAME / "CMakeLists.txt"):
        assert parse_cmake(path.read_text(encoding="utf-8")), path


def test_top_level_structure(top_cmake):
    commands, _ = top_cmake
    names = [c.name for c in commands]
    (cmr,) = find_commands(commands, "cmake_minimum_required")
    assert cmr.args[0] == "VERSION" and cmr.args[1].split("...")[0] == "3.16.3"
    assert find_commands(commands, "project")[0].args[0] == "SAMSegment"
    assert ["Slicer", "REQUIRED"] == find_commands(commands, "find_package")[0].args
    includes = [c.args[0] for c in find_commands(commands, "include")]
    assert includes == [
        "${Slicer_USE_FILE}",
        "${Slicer_EXTENSION_GENERATE_CONFIG}",
        "${Slicer_EXTENSION_CPACK}",
    ]
    assert [c.args for c in find_commands(commands, "add_subdirectory")] == [["SAMSegment"]]
    # order: find Slicer, use it, add the module, then generate config and package
    order = [names.index("find_package"), names.index("add_subdirectory")]
    cpack = max(i for i, c in enumerate(commands) if c.name == "include")
    assert order[0] < order[1] < cpack
    assert names.index("project") < order[0]


def test_extension_metadata(top_cmake):
    _, variables = top_cmake
    for name in REQUIRED_EXTENSION_VARIABLES:
        assert name in variables and "".join(variables[name]).strip(), f"{name} is not set"
    assert variables["EXTENSION_DEPENDS"] == ["NA"]  # nothing is installed into Slicer's Python
    assert variables["EXTENSION_CATEGORY"] == ["Segmentation"]
    homepage = variables["EXTENSION_HOMEPAGE"][0]
    assert homepage == "https://github.com/samsegment/SlicerSAMSegment"
    description = variables["EXTENSION_DESCRIPTION"][0]
    for word in ("Segment Anything", "LiteMedSAM", "MedSAM", "propagation", "Segment Editor"):
        assert word in description
    assert description.count(". ") == 0 and description.endswith("."), "one sentence"
    # The icon URL points at a file of this repository (at the branch named in the catalog).
    raw = "https://raw.githubusercontent.com/samsegment/SlicerSAMSegment/main/"
    icon_url = variables["EXTENSION_ICONURL"][0]
    assert icon_url.startswith(raw) and (REPO / icon_url[len(raw) :]).is_file()
    for url in variables["EXTENSION_SCREENSHOTURLS"][0].split():
        assert url.startswith(raw) and url.endswith(".png")
    # License and readme packaged with the extension are ours.
    assert variables["EXTENSION_LICENSE_FILE"] == ["${CMAKE_CURRENT_SOURCE_DIR}/LICENSE"]
    assert variables["EXTENSION_README_FILE"] == ["${CMAKE_CURRENT_SOURCE_DIR}/README.md"]
    assert (REPO / "LICENSE").is_file() and (REPO / "README.md").is_file()


def test_module_cmake_structure(module_cmake):
    commands, variables = module_cmake
    assert variables["MODULE_NAME"] == ["SAMSegment"]
    (build,) = find_commands(commands, "slicerMacroBuildScriptedModule")
    args = build.args
    assert args[args.index("NAME") + 1] == "${MODULE_NAME}"
    assert args[args.index("SCRIPTS") + 1] == "${MODULE_PYTHON_SCRIPTS}"
    assert args[args.index("RESOURCES") + 1] == "${MODULE_PYTHON_RESOURCES}"
    # The engine package is copied and installed by the foreach over its two lists.
    loops = [c for c in find_commands(commands, "foreach") if "SAMSegmentLib_PYTHON_SCRIPTS" in c.args]
    assert loops and "SAMSegmentLib_PYTHON_RESOURCES" in loops[0].args
    body = [c.name for c in commands if c.line > loops[0].line]
    assert {"configure_file", "install"} <= set(body[: body.index("endforeach")])
    installs = [c for c in find_commands(commands, "install") if c.line > loops[0].line]
    assert any(
        "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${_relative_dir}" in c.args for c in installs
    )


def test_unittest_registered(module_cmake):
    commands, _ = module_cmake
    names = [c.name for c in commands]
    (unittest,) = find_commands(commands, "slicer_add_python_unittest")
    assert unittest.args == ["SCRIPT", "${MODULE_NAME}.py"]
    # inside if(BUILD_TESTING) ... endif()
    i = names.index("slicer_add_python_unittest")
    opening = max(j for j in range(i) if names[j] == "if")
    assert commands[opening].args == ["BUILD_TESTING"]
    assert "endif" in names[i:]


def test_unittest_script_is_listed():
    script = REPO / MODULE_DIR_NAME / "SAMSegment.py"
    if not script.exists():
        pytest.skip("SAMSegment/SAMSegment.py is not written yet")
    assert "SAMSegment/SAMSegment.py" in listed_package_files(REPO)["MODULE_PYTHON_SCRIPTS"]


def test_cmake_lists_match_tree():
    report = check_cmake_listing(REPO)
    assert report.ok, (
        f"SAMSegment/CMakeLists.txt is out of date ({report}).\n"
        f"Lists matching the tree (python {Path(__file__).relative_to(REPO)}):\n"
        + suggested_cmake_lists(REPO)
    )


def test_required_files_are_listed():
    lists = listed_package_files(REPO)
    listed = {p for entries in lists.values() for p in entries}
    for required in (
        "SAMSegment/Resources/Icons/SAMSegment.png",
        "SAMSegment/Resources/Icons/SAMSegmentEffect.png",
        "SAMSegment/Resources/requirements.txt",
        "SAMSegmentLib/__init__.py",
        "SAMSegmentLib/models.json",
    ):
        assert required in listed, required
    assert any(p.startswith("SAMSegmentLib/sample_data/") for p in lists["SAMSegmentLib_PYTHON_RESOURCES"])
    ui = REPO / "SAMSegment/Resources/UI/SAMSegment.ui"
    if ui.exists():
        assert "SAMSegment/Resources/UI/SAMSegment.ui" in lists["MODULE_PYTHON_RESOURCES"]


def _copy_tree(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (MODULE_DIR_NAME, LIB_DIR_NAME):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    return dst


def test_checker_detects_unlisted_and_missing_files(tmp_path):
    root = _copy_tree(tmp_path)
    assert check_cmake_listing(root).ok, check_cmake_listing(root)

    new_files = [
        "SAMSegmentLib/new_backend.py",
        "SAMSegmentLib/sample_data/mr_brain.nii.gz",
        "SAMSegment/SAMSegmentSlicer/extra_effect.py",
        "SAMSegment/Resources/UI/Extra.ui",
        "SAMSegmentLib/extra_models.json",
    ]
    for rel in new_files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    # ignored: caches and editor droppings
    (root / "SAMSegmentLib/__pycache__").mkdir(exist_ok=True)
    (root / "SAMSegmentLib/__pycache__/io.cpython-311.pyc").write_bytes(b"x")
    report = check_cmake_listing(root)
    assert report.unlisted == sorted(new_files)
    assert not report.missing

    # a listed file deleted from the tree
    (root / "SAMSegmentLib/models.json").unlink()
    assert check_cmake_listing(root).missing == ["SAMSegmentLib/models.json"]


def test_checker_detects_entry_removed_from_cmake(tmp_path):
    root = _copy_tree(tmp_path)
    text = (root / MODULE_DIR_NAME / "CMakeLists.txt").read_text(encoding="utf-8")
    edited = re.sub(r"^\s*\.\./SAMSegmentLib/models\.json\s*\n", "", text, flags=re.M)
    assert edited != text
    report = check_cmake_listing(root, edited)
    assert report.unlisted == ["SAMSegmentLib/models.json"] and not report.missing

    # a library file put in a module list (wrong install location) and a duplicate entry
    edited = text.replace(
        "set(MODULE_PYTHON_RESOURCES\n", "set(MODULE_PYTHON_RESOURCES\n  ../SAMSegmentLib/io.py\n"
    )
    report = check_cmake_listing(root, edited)
    assert report.misplaced == ["SAMSegmentLib/io.py (in MODULE_PYTHON_RESOURCES)"]
    assert report.duplicates == ["SAMSegmentLib/io.py"]


def test_parser_handles_quotes_comments_and_variables():
    commands = parse_cmake(
        'set(A "x (y) # not a comment" z) # comment\n'
        "set(B ${A} w)\n"
        "foo(\n  a # c\n  \"q\\\"r\"\n  (nested)\n)\n"
    )
    variables = cmake_set_variables(commands)
    assert variables["A"] == ["x (y) # not a comment", "z"]
    assert variables["B"] == ["x (y) # not a comment;z", "w"]
    assert commands[2].args == ["a", 'q"r', "(nested)"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_icons():
    top = REPO / "Resources/Icons/SAMSegment.png"
    module = REPO / "SAMSegment/Resources/Icons/SAMSegment.png"
    effect = REPO / "SAMSegment/Resources/Icons/SAMSegmentEffect.png"
    assert _png_size(top) == (128, 128)
    assert top.read_bytes() == module.read_bytes()
    assert _png_size(effect) == (21, 21)
    assert (REPO / "Resources/make_icon.py").is_file()


def test_screenshot_urls_point_at_files_in_this_repository():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("EXTENSION_SCREENSHOTURLS", "EXTENSION_ICONURL"):
        url = re.search(rf'set\({variable} "([^"]+)"\)', text).group(1)
        relative = url.split("/main/", 1)[1]
        width, height = _png_size(REPO / relative)
        assert width >= 128 and height >= 128, relative
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "Resources/Screenshots/SAMSegment-screenshot.png" in readme
    assert (REPO / "Resources/make_screenshot.py").is_file()


def test_icon_generator_is_reproducible(tmp_path):
    pytest.importorskip("PIL")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_icon", REPO / "Resources" / "make_icon.py")
    make_icon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icon)
    assert make_icon.main(["--root", str(tmp_path)]) == 0
    assert _png_size(tmp_path / "Resources/Icons/SAMSegment.png") == (128, 128)
    assert _png_size(tmp_path / "SAMSegment/Resources/Icons/SAMSegmentEffect.png") == (21, 21)


def test_license_is_apache_2():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    for phrase in (
        "Apache License",
        "Version 2.0, January 2004",
        "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
        "9. Accepting Warranty or Additional Liability.",
        "END OF TERMS AND CONDITIONS",
        "Copyright 2026 SAMSegment developers",
        "http://www.apache.org/licenses/LICENSE-2.0",
    ):
        assert phrase in text, phrase
    assert "[yyyy]" not in text
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'license\s*=\s*\{\s*text\s*=\s*"Apache-2.0"', pyproject)


def test_catalog_entry(top_cmake):
    _, variables = top_cmake
    entry = json.loads((REPO / "SAMSegment.json").read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry), CATALOG_REQUIRED - set(entry)
    assert set(entry) <= CATALOG_PROPERTIES, set(entry) - CATALOG_PROPERTIES
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
        "slicer-extension-catalog-entry-schema-v1.0.1.json"
    )
    assert entry["category"] == variables["EXTENSION_CATEGORY"][0]
    assert entry["scm_url"] == variables["EXTENSION_HOMEPAGE"][0]
    assert entry["scm_revision"] == "main"
    assert entry["build_subdirectory"] == "."
    # The Extensions Index builds build_dependencies first; EXTENSION_DEPENDS names the same ones, "NA"
    # for none (the extension template's convention). No PyTorch extension: the model runs in the
    # local server's own environment, nothing is installed into Slicer's Python.
    assert entry["build_dependencies"] == [] and variables["EXTENSION_DEPENDS"] == ["NA"]
    assert entry["tier"] in (1, 3, 5)


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_match_pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    expected = {
        d.replace(" ", "")
        for d in project["dependencies"]
        if _requirement_name(d) not in ("torch", "torchvision")
    }
    lines = (REPO / "SAMSegment/Resources/requirements.txt").read_text(encoding="utf-8").splitlines()
    listed = {ln.split("#")[0].strip().replace(" ", "") for ln in lines}
    listed.discard("")
    assert listed == expected
    assert not {_requirement_name(r) for r in listed} & {"torch", "torchvision"}


if __name__ == "__main__":
    result = check_cmake_listing(REPO)
    print(f"# SAMSegment/CMakeLists.txt listing: {result}\n")
    print(suggested_cmake_lists(REPO))
    sys.exit(0 if result.ok else 1)
