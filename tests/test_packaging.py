"""Publishing to the Comfy Registry: pyproject.toml, the icon, and the archive that is uploaded.

The archive is built as `comfy node pack` builds it (comfy-cli's ``zip_files``): the git-tracked
files, minus what ``.comfyignore`` matches (gitignore syntax), plus ``[tool.comfy] includes``.
The test works on a throw-away git repository holding the project's files as they will be once
committed (tracked files plus untracked, not ignored ones), and lets git itself do the
gitignore-style matching. The archive is then unpacked into a ComfyUI custom_nodes folder and
ComfyUI must import it.

When comfy-cli is installed (``comfy`` on PATH, ``.cache/comfy-cli/bin/comfy`` or
DERADIFF_COMFY_CLI=/path/to/comfy), ``comfy node validate`` and ``comfy node pack`` run too,
offline, and the real archive must list exactly the files computed here.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfyui-deradiff"

# What a user's ComfyUI needs from the pack, and what must stay out of the archive.
MUST_SHIP = ["__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt", "js/deradiff.js",
             "locales/en/main.json",
             "nodes/__init__.py", "sampler/__init__.py"]
MUST_SHIP_DIRS = ["nodes", "sampler", "js", "example_workflows", "subgraphs"]  # subgraphs/: the blueprint
MUST_NOT_SHIP = ["tests/", "benchmarks/", "scripts/", ".ci/", "docs/", ".gitignore", "test-artifacts/", ".cache/",
                 ".venv/", "tiny_family/"]
ARCHIVE_LIMIT = 3 * 1024 * 1024  # bytes, compressed: code, two README-sized texts, five thumbnails


def git(*args, cwd=REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def project_files() -> list[str]:
    """The files the repository will hold once this working tree is committed."""
    names = git("ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    return sorted({n for n in names if n and (REPO / n).is_file()})


@pytest.fixture(scope="module")
def pyproject():
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A git repository (index only, nothing committed) with the project's files."""
    dest = tmp_path_factory.mktemp("pack") / PACK_DIR_NAME
    for name in project_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    return dest


def archive_names(repo: Path, includes=()) -> set[str]:
    """comfy-cli's zip_files: tracked files, minus .comfyignore matches, plus includes."""
    tracked = set(git("ls-files", "-z", cwd=repo).split("\0")) - {""}
    ignored = set()
    if (repo / ".comfyignore").exists():
        ignored = set(git("ls-files", "-z", "--cached", "--ignored", "--exclude-from=.comfyignore",
                          cwd=repo).split("\0")) - {""}
    names = tracked - ignored
    for inc in includes:
        path = repo / inc.lstrip("/")
        if path.is_file():
            names.add(path.relative_to(repo).as_posix())
        else:
            names |= {p.relative_to(repo).as_posix() for p in path.rglob("*") if p.is_file()}
    return names


@pytest.fixture(scope="module")
def archive(mirror, pyproject, tmp_path_factory):
    """The archive as `comfy node pack` writes it (node.zip)."""
    names = archive_names(mirror, pyproject.get("tool", {}).get("comfy", {}).get("includes", []))
    path = tmp_path_factory.mktemp("zip") / "node.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(names):
            zf.write(mirror / name, name)
    return path


# -- pyproject.toml, as the registry reads it ----------------------------------------------
# Rules: docs.comfy.org/registry/specifications, and comfy-cli's registry/config_parser.py.

def test_project_table(pyproject):
    project = pyproject["project"]
    dynamic = project.get("dynamic", [])
    for key in ("name", "version", "description", "license", "dependencies"):
        assert key in project and key not in dynamic, f"[project] {key} must be set statically"
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), (
        f"node id {name!r}: letters, digits, single '-', '_' or '.' between them, starting with a letter")
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "version must be X.Y.Z (semantic versioning)"
    assert isinstance(project["description"], str) and 10 <= len(project["description"].strip()) <= 1000
    lic = project["license"]
    assert isinstance(lic, dict) and ("file" in lic or "text" in lic), \
        'license must be {file = "LICENSE"} or {text = "..."}'
    if "file" in lic:
        assert (REPO / lic["file"]).is_file() and lic["file"] in project_files()
    deps = project["dependencies"]
    assert isinstance(deps, list) and all(isinstance(d, str) for d in deps)
    # ComfyUI Manager installs requirements.txt, the registry the dependencies: the same list
    reqs = [line.split("#", 1)[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert sorted(r for r in reqs if r) == sorted(deps)
    assert not any(re.match(r"torch\b", d) for d in deps), "never make the Manager reinstall torch"


def test_urls_and_tool_comfy(pyproject):
    repo_url = pyproject["project"]["urls"]["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo_url), repo_url
    comfy = pyproject["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    assert comfy["DisplayName"].strip()
    assert isinstance(comfy.get("includes", []), list)
    for inc in comfy.get("includes", []):
        assert (REPO / inc.lstrip("/")).exists(), f"[tool.comfy] includes {inc!r}, which does not exist"


def test_icon(pyproject):
    """The Icon URL points at a file of this repository: square, at most 400x400, tracked."""
    icon = pyproject["tool"]["comfy"]["Icon"]
    owner_repo = pyproject["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    m = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/[^/]+/(.+\.(png|jpg|jpeg|svg|gif|webp))",
                     icon)
    assert m, f"Icon {icon!r} is not a raw.githubusercontent.com URL into {owner_repo}"
    path = m.group(1)
    assert path in project_files(), f"the icon {path} is not in the repository"
    if not path.endswith(".svg"):
        w, h = Image.open(REPO / path).size
        assert w == h and w <= 400, f"{path} is {w}x{h}; the registry wants a square icon of at most 400x400"


def test_readme_quick_start_refers_to_files_that_exist():
    readme = (REPO / "README.md").read_text()
    start, end = readme.index("<!-- quickstart:start -->"), readme.index("<!-- quickstart:end -->")
    quick = readme[start:end]
    files = project_files()
    for link in re.findall(r"\]\(((?:docs|example_workflows)/[^)]*)\)", quick):
        assert link.rstrip("/") in files or any(f.startswith(link) for f in files), f"README links {link}"
    for name in re.findall(r"`(deradiff_\w+)`", quick):
        assert f"example_workflows/{name}.json" in files, f"README names {name}, which is no example workflow"
    workflows = [f for f in files if f.startswith("example_workflows/") and f.endswith(".json")]
    for wf in workflows:
        assert f"`{Path(wf).stem}`" in quick, f"{wf} is not in the README quick start"


# -- the archive ----------------------------------------------------------------------------

def test_archive_contents(archive):
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
    for name in MUST_SHIP:
        assert name in names, f"{name} is not in the archive"
    files = project_files()
    for folder in MUST_SHIP_DIRS:
        expected = {f for f in files if f.startswith(folder + "/") and "__pycache__" not in f}
        assert expected and expected <= names, f"missing from the archive: {sorted(expected - names)}"
    for prefix in MUST_NOT_SHIP:
        leaked = sorted(n for n in names if n == prefix or n.startswith(prefix))
        assert not leaked, f"{prefix} must stay out of the archive: {leaked[:5]}"
    assert not [n for n in names if n.endswith((".safetensors", ".ckpt", ".pt", ".pth"))]
    # every example workflow with its thumbnail (the templates browser shows .jpg only)
    workflows = {n for n in names if n.startswith("example_workflows/") and n.endswith(".json")}
    assert workflows
    for wf in workflows:
        assert wf[:-5] + ".jpg" in names, f"{wf} has no .jpg thumbnail"
    size = archive.stat().st_size
    assert size < ARCHIVE_LIMIT, f"the archive is {size / 1e6:.1f} MB"


def test_archive_imports_only_what_it_ships(archive, tmp_path):
    """Every import of the pack's own modules resolves to a file in the archive."""
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        for name in sorted(n for n in names if n.endswith(".py")):
            tree = ast.parse(zf.read(name), filename=name)
            package = Path(name).parent
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package
                    for _ in range(node.level - 1):
                        base = base.parent
                    target = base.joinpath(*(node.module or "").split(".")) if node.module else base
                    candidates = [f"{target.as_posix()}.py", f"{target.as_posix()}/__init__.py"]
                    if not node.module:  # from . import x
                        candidates = [f"{(target / a.name).as_posix()}.py" for a in node.names] + \
                                     [f"{(target / a.name).as_posix()}/__init__.py" for a in node.names]
                    candidates = [c.removeprefix("./") for c in candidates]
                    assert any(c in names for c in candidates), \
                        f"{name}:{node.lineno} imports {'.' * node.level}{node.module or ''}, which is not in the archive"
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                    for mod in mods:
                        top = mod.split(".")[0]
                        assert top not in ("tests", "scripts", "benchmarks", "conftest", "standins"), \
                            f"{name}:{node.lineno} imports {mod}, which does not ship"


def test_archive_loads_in_comfyui(archive, comfy_root, tmp_path):
    """Unpacked as the registry installs it, ComfyUI imports the pack and serves its JS."""
    custom_nodes = tmp_path / "custom_nodes"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(custom_nodes / PACK_DIR_NAME)
    for d in ("out", "temp", "user"):
        (tmp_path / d).mkdir()
    paths = tmp_path / "extra_model_paths.yaml"
    paths.write_text(f"deradiff_pack:\n    base_path: {tmp_path}\n    custom_nodes: {custom_nodes}\n")
    log = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--extra-model-paths-config", str(paths),
         "--output-directory", str(tmp_path / "out"), "--temp-directory", str(tmp_path / "temp"),
         "--user-directory", str(tmp_path / "user")],
        cwd=comfy_root, capture_output=True, text=True, timeout=300)
    text = log.stdout + log.stderr
    lines = [line for line in text.splitlines() if str(custom_nodes / PACK_DIR_NAME) in line]
    assert lines, f"ComfyUI did not look at the unpacked pack:\n{text[-3000:]}"
    assert not any("IMPORT FAILED" in line for line in lines), f"the archive does not import:\n{text[-5000:]}"
    assert log.returncode == 0, text[-3000:]


# -- comfy-cli itself, when installed --------------------------------------------------------

def comfy_cli() -> str | None:
    for candidate in (os.environ.get("DERADIFF_COMFY_CLI"), str(REPO / ".cache" / "comfy-cli" / "bin" / "comfy"),
                      shutil.which("comfy")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def run_comfy_cli(exe, args, cwd, home):
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    env["PATH"] = str(Path(exe).parent) + os.pathsep + env.get("PATH", "")  # its ruff
    return subprocess.run([exe, "--skip-prompt", "--no-enable-telemetry", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(comfy_cli() is None, reason="comfy-cli is not installed (pip install comfy-cli)")
def test_comfy_cli_validate_and_pack(mirror, archive, tmp_path):
    exe = comfy_cli()
    out = run_comfy_cli(exe, ["node", "validate"], mirror, tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "Error" not in text, text[-3000:]
    # its security checks (ruff S102 exec, S307 eval, E702 `;`) on files that ship: none
    with zipfile.ZipFile(archive) as zf:
        shipped = set(zf.namelist())
    flagged = set(re.findall(r"-->\s*([^\s:]+):\d+", text))
    assert not flagged & shipped, f"comfy node validate flags shipped files: {sorted(flagged & shipped)}\n{text[-3000:]}"
    out = run_comfy_cli(exe, ["node", "pack"], mirror, tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    with zipfile.ZipFile(mirror / "node.zip") as zf:
        packed = set(zf.namelist())
    assert packed == shipped, (f"comfy node pack: extra {sorted(packed - shipped)}, "
                               f"missing {sorted(shipped - packed)}")


def test_locales_file_is_current(comfy_root):
    """locales/en/main.json (the front end's nodeDefs: names, descriptions, tooltips) is made from the node
    classes by scripts/make_locales.py; a tooltip changed without regenerating it fails here."""
    import json
    out = subprocess.run([sys.executable, "scripts/make_locales.py", "--check"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, DERADIFF_COMFYUI=str(comfy_root)))
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    defs = json.loads((REPO / "locales" / "en" / "main.json").read_text(encoding="utf-8"))["nodeDefs"]
    assert defs["DeRaDiffKSampler"]["inputs"]["lambda"]["tooltip"]


# -- registry metadata and the publish workflow -----------------------------------------------

def test_requires_comfyui_and_classifiers(pyproject):
    """requires-comfyui (read by comfy-cli under [tool.comfy]) is the oldest ComfyUI the suite runs on."""
    comfy = pyproject["tool"]["comfy"]
    assert "requires-comfyui" not in pyproject["project"], "comfy-cli reads requires-comfyui under [tool.comfy] only"
    spec = comfy["requires-comfyui"]
    m = re.fullmatch(r">=(\d+)\.(\d+)\.(\d+)", spec)
    assert m, spec
    runtime = (REPO / "scripts" / "comfyui_runtime.py").read_text()
    pinned = re.search(r"ComfyUI (\d+\.\d+\.\d+) tree is unpacked", runtime)
    assert pinned, "scripts/comfyui_runtime.py names the ComfyUI version the tests install"
    assert spec == f">={pinned.group(1)}"
    default_tree = REPO / ".cache" / "comfyui" / "comfyui_version.py"
    if default_tree.exists():  # the tree the tests install is that version
        assert f'"{pinned.group(1)}"' in default_tree.read_text()
    classifiers = pyproject["project"].get("classifiers", [])
    assert classifiers and all(c.startswith(("Operating System ::", "Environment :: GPU ::", "Environment :: NPU ::"))
                               for c in classifiers), classifiers


def _publish_workflow():
    import yaml
    data = yaml.safe_load((REPO / ".github" / "workflows" / "publish.yml").read_text())
    return data, data.get("on", data.get(True))  # YAML 1.1 reads the key `on` as true


def test_publish_workflow_structure():
    data, on = _publish_workflow()
    assert "workflow_dispatch" in on
    assert on["push"]["branches"] == ["main"] and on["push"]["paths"] == ["pyproject.toml"]
    (job,) = data["jobs"].values()
    assert job["runs-on"].startswith("ubuntu")
    steps = job["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@") and steps[0]["with"]["fetch-depth"] >= 2
    publish = [s for s in steps if s.get("uses", "").startswith("Comfy-Org/publish-node-action@")]
    assert len(publish) == 1
    assert publish[0]["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    assert "steps.version.outputs.changed == 'true'" in publish[0]["if"]
    assert any(s.get("id") == "version" for s in steps)


def test_publish_workflow_publishes_only_on_a_version_change(tmp_path):
    """The workflow's version step, run as GitHub would (bash, GITHUB_OUTPUT) on a repository whose last commit
    changes pyproject.toml with and without a new version."""
    import shutil
    import subprocess
    import sys
    import tomllib  # noqa: F401  (the step needs Python 3.11's tomllib)
    data, _ = _publish_workflow()
    (job,) = data["jobs"].values()
    script = next(s for s in job["steps"] if s.get("id") == "version")["run"]
    git = shutil.which("git")
    if git is None:
        pytest.skip("no git")
    py = tmp_path / "bin"
    py.mkdir()
    (py / "python3").symlink_to(sys.executable)  # the step calls python3

    def changed(before: str, after: str) -> str:
        repo = tmp_path / f"r{before}-{after}"
        repo.mkdir()
        env = {"PATH": f"{py}:/usr/bin:/bin", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(tmp_path)}
        run = lambda *a: subprocess.run([git, *a], cwd=repo, env=env, check=True, capture_output=True)
        run("init", "-q")
        for i, version in enumerate((before, after)):
            (repo / "pyproject.toml").write_text(f'[project]\nname = "x"\nversion = "{version}"\ndescription = "{i}"\n')
            run("add", "pyproject.toml")
            run("commit", "-q", "-m", str(i))
        out = tmp_path / f"out-{before}-{after}"
        out.write_text("")
        subprocess.run(["bash", "-e", "-c", script], cwd=repo, env=dict(env, GITHUB_OUTPUT=str(out)), check=True,
                       capture_output=True)
        return out.read_text().strip()
    assert changed("0.1.0", "0.1.1") == "changed=true"
    assert changed("0.1.0", "0.1.0") == "changed=false"  # pyproject.toml changed, the version did not
