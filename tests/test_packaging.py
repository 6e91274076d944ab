"""Building the wheel (what a GPU cluster installs): setup.py's knobs and what the wheel holds.

Builds run on a copy of the sources in a temporary folder, so the checkout gets no build/ folder.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, copy_sources


def _missing_build_requirements():
    # Without build isolation pip uses what is installed: pyproject's [build-system] requirements.
    import importlib.metadata
    import importlib.util

    setuptools_version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    if importlib.util.find_spec("wheel") is None and setuptools_version < (70, 1):
        return "no `wheel` package and setuptools < 70.1: `pip install wheel` (the dev extra has it)"
    return None


_MISSING = _missing_build_requirements()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))


def _pip_wheel(src: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(out), str(src)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )


def test_pure_python_wheel_holds_the_package_and_its_model_configs(tmp_path):
    src, out = copy_sources(tmp_path / "src"), tmp_path / "dist"
    result = _pip_wheel(src, out, VLMRM_FAST_SKIP_CUDA_BUILD="1")
    assert result.returncode == 0, result.stderr
    assert "VLMRM_FAST_SKIP_CUDA_BUILD is set" in result.stdout + result.stderr
    (wheel,) = out.glob("vlmrm_fast-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # no extension: one wheel for every platform
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.name for p in (ROOT / "vlmrm_fast" / "model_configs").glob("*.json")}
    assert configs and {f"vlmrm_fast/model_configs/{c}" for c in configs} <= names
    assert "vlmrm_fast/reward.py" in names and "vlmrm_fast/backends/tensorrt.py" in names
    assert "vlmrm_fast/py.typed" in names  # type checkers read the package's annotations (PEP 561)
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names), names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    import vlmrm_fast  # the version is written once, in the package; the wheel's metadata reads it there

    assert f"\nVersion: {vlmrm_fast.__version__}\n" in metadata and f"-{vlmrm_fast.__version__}-" in wheel.name
    # License-Expression from setuptools 77, whose table form of the licence stops building in 2027.
    assert "\nLicense-Expression: MIT\n" in metadata or "\nLicense: MIT\n" in metadata, metadata[:800]
    assert "SetuptoolsDeprecationWarning" not in result.stdout + result.stderr
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vlmrm-fast = vlmrm_fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_a_module_left_in_build_by_an_earlier_build_does_not_ship(tmp_path):
    # `git pull` (a module deleted or renamed) and the wheel built again in the same checkout: setuptools
    # copies the package into build/ over what an earlier build left there and never removes the rest.
    import sysconfig

    src, out = copy_sources(tmp_path / "src"), tmp_path / "dist"
    for lib in ("lib", f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"):
        (src / "build" / lib / "vlmrm_fast").mkdir(parents=True)
        (src / "build" / lib / "vlmrm_fast" / "removed_since.py").write_text("x = 1\n")
    result = _pip_wheel(src, out, VLMRM_FAST_SKIP_CUDA_BUILD="1")
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("vlmrm_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vlmrm_fast/reward.py" in names and "vlmrm_fast/removed_since.py" not in names


def test_forced_cuda_build_without_the_toolkit_fails_and_says_why(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build: the forced build stops earlier, at 'CPU-only build'")
    src, out = copy_sources(tmp_path / "src"), tmp_path / "dist"
    no_toolkit = tmp_path / "no-cuda"  # CUDA_HOME without bin/nvcc: as on a machine without the toolkit
    no_toolkit.mkdir()
    result = _pip_wheel(src, out, VLMRM_FAST_FORCE_BUILD="1", CUDA_HOME=str(no_toolkit), CUDA_PATH="")
    assert result.returncode != 0
    assert "VLMRM_FAST_FORCE_BUILD: the CUDA toolkit (nvcc, CUDA_HOME) was not found" in result.stdout + result.stderr
    assert not list(out.glob("*.whl"))


def _nvcc_found() -> bool:
    import shutil

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and os.path.exists(os.path.join(h, "bin", "nvcc")) for h in homes)


def test_forced_cuda_build_gives_a_platform_wheel_with_the_extension(tmp_path):
    # What the README's cluster recipe promises: a wheel for this platform holding the compiled
    # GL-CUDA extension; and a source that does not compile fails the forced build, with no wheel.
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None or not _nvcc_found():
        pytest.skip("needs a CUDA build of torch and nvcc (the CUDA toolkit) to compile the extension")
    broken = copy_sources(tmp_path / "broken")
    source = broken / "csrc" / "gl_cuda_readback.cpp"
    source.write_text("#error broken on purpose\n" + source.read_text())
    result = _pip_wheel(broken, tmp_path / "broken-dist", VLMRM_FAST_FORCE_BUILD="1", VLMRM_FAST_CUDA_ARCHS="9.0")
    assert result.returncode != 0 and "broken on purpose" in result.stdout + result.stderr
    assert not list((tmp_path / "broken-dist").glob("*.whl"))

    src, out = copy_sources(tmp_path / "src"), tmp_path / "dist"
    result = _pip_wheel(src, out, VLMRM_FAST_FORCE_BUILD="1", VLMRM_FAST_CUDA_ARCHS="9.0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("vlmrm_fast-*.whl")
    assert wheel.name.endswith("_x86_64.whl") and f"-cp{sys.version_info[0]}{sys.version_info[1]}-" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    (library,) = [n for n in names if n.startswith("vlmrm_fast/_render_cuda") and n.endswith(".so")]
    # It names the torch it was built against, for the message when it does not load elsewhere.
    import re

    info = re.search(rb"vlmrm_fast extension built with: torch ([\d.]+), CUDA runtime \d+\x00",
                     zipfile.ZipFile(wheel).read(library))
    # This torch's release: "2.6.0" of an NGC container's "2.6.0a0+ecf3bae", as torch's headers write it.
    assert info is not None and info.group(1).decode() == re.match(r"\d+\.\d+\.\d+", torch.__version__).group(0)


@pytest.mark.parametrize("knobs", [
    {"VLMRM_FAST_SKIP_CUDA_BUILD": "1"},
    # A job that exports the forced build for its wheel also makes its sdist, which compiles nothing:
    # no toolkit, nor a torch, nor a valid arch list is needed for it.
    {"VLMRM_FAST_FORCE_BUILD": "1", "CUDA_HOME": "/nonexistent/cuda", "VLMRM_FAST_CUDA_ARCHS": "garbage"},
], ids=["skip", "forced"])
def test_source_distribution_holds_the_extension_source(tmp_path, knobs):
    # A cluster may build its wheel from the sdist, made anywhere (here: where no extension is built,
    # as in an isolated `python -m build --sdist`): csrc/ must be in it, tests and benchmarks not.
    import tarfile

    src = copy_sources(tmp_path / "src")
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                            env={**os.environ, **knobs}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no CUDA extension" not in result.stderr  # nothing tried, so no note either
    (sdist,) = (tmp_path / "dist").glob("vlmrm*-*.tar.gz")  # vlmrm_fast- or, setuptools < 69, vlmrm-fast-
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"csrc/gl_cuda_readback.cpp", "setup.py", "pyproject.toml", "vlmrm_fast/model_configs/vlmrm-tiny.json"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) or n.endswith(".so") for n in names)


def test_an_extension_that_does_not_load_is_reported_as_such(tmp_path):
    # Built against another torch (undefined symbols) or damaged: the GPU path says so and how to fix
    # it, instead of "not built".
    import importlib.machinery

    src = copy_sources(tmp_path / "src")
    library = src / "vlmrm_fast" / f"_render_cuda{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    code = "import vlmrm_fast.render._cuda as c; print(c.__file__); print(c.gpu_unavailable_reason())"

    def reason_given() -> str:
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(src)},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        where, reason = result.stdout.splitlines()[:2]
        assert where.startswith(str(src))
        return reason

    library.write_bytes(b"not a library")
    reason = reason_given()
    assert "built but does not load" in reason and "usually it was built against another torch" in reason
    # One that names what it was built against (as csrc/ writes it into the library): named in turn.
    library.write_bytes(b"\x7fELF...\x00vlmrm_fast extension built with: torch 2.6.0, CUDA runtime 12040\x00...")
    reason = reason_given()
    assert "built but does not load" in reason and "it was built against torch 2.6.0 and CUDA 12.4, and this is torch" in reason
    import re

    import torch

    release = re.match(r"\d+\.\d+\.\d+", torch.__version__).group(0)  # built against this torch's release
    library.write_bytes(f"...vlmrm_fast extension built with: torch {release}, CUDA runtime 12040\x00".encode())
    reason = reason_given()
    assert f"against torch {release} and CUDA 12.4, the release of this torch" in reason and "the error names" in reason


def _fake_toolkit(root: Path) -> Path:
    """A CUDA toolkit folder (headers where setup.py looks) whose nvcc fails: any compile in it fails."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").touch()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: broken on purpose' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    return root


def _sources_with_an_earlier_build(tmp_path: Path):
    """(sources, wheel folder, extension): a copy of the sources whose build/ holds an extension left by an
    earlier build (against another torch, say), newer than its sources."""
    import sysconfig

    src = copy_sources(tmp_path / "src")
    platlib = src / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}" / "vlmrm_fast"
    platlib.mkdir(parents=True)
    stale = platlib / f"_render_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    stale.write_bytes(b"an earlier build")
    return src, tmp_path / "dist", stale


def test_a_failed_optional_build_gives_a_pure_wheel_without_a_stale_extension(tmp_path):
    # Without VLMRM_FAST_FORCE_BUILD, a GPU machine whose build of the extension fails still installs: the
    # wheel must then be what it holds (pure Python, py3-none-any), and an extension left in build/ by an
    # earlier build (against another torch, say) must not ship in place of the one that failed.
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build: setup.py does not try the extension")
    src, out, stale = _sources_with_an_earlier_build(tmp_path)
    fake_gpu = tmp_path / "fake-gpu"  # torch.cuda.is_available() is True in the build's processes
    fake_gpu.mkdir()
    (fake_gpu / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    result = _pip_wheel(src, out, PYTHONPATH=str(fake_gpu), CUDA_HOME=str(_fake_toolkit(tmp_path / "cuda")),
                        VLMRM_FAST_CUDA_ARCHS="9.0")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert f"building vlmrm_fast._render_cuda (CUDA_HOME={tmp_path / 'cuda'}" in log  # the build was tried
    assert "building vlmrm_fast._render_cuda failed, installing without it" in log
    (wheel,) = out.glob("vlmrm_fast-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "vlmrm_fast/reward.py" in names and not any(n.endswith(".so") for n in names), names
    assert not stale.exists()


def test_a_forced_build_rebuilds_an_extension_left_in_build_by_an_earlier_one(tmp_path):
    # A wheel built again in the same checkout after `pip install torch==...`: setuptools takes an output
    # newer than its sources as up to date, and without ninja nothing else forces the build. Here the
    # build must run (and, its toolkit broken, fail), not ship the earlier build's library.
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build: a forced build stops before compiling")
    src, out, _ = _sources_with_an_earlier_build(tmp_path)
    no_ninja = tmp_path / "no-ninja"  # torch's builder forces rebuilds itself when ninja runs
    no_ninja.mkdir()
    (no_ninja / "ninja").write_text("#!/bin/sh\nexit 1\n")
    (no_ninja / "ninja").chmod(0o755)
    result = _pip_wheel(src, out, PATH=f"{no_ninja}{os.pathsep}{os.environ.get('PATH', '')}",
                        CUDA_HOME=str(_fake_toolkit(tmp_path / "cuda")), VLMRM_FAST_FORCE_BUILD="1",
                        VLMRM_FAST_CUDA_ARCHS="9.0")
    log = result.stdout + result.stderr
    assert "skipping 'vlmrm_fast._render_cuda' extension (up-to-date)" not in log
    assert result.returncode != 0 and not list(out.glob("*.whl")), log[-3000:]


def test_the_toolkit_of_the_nvcc_on_path_comes_before_the_system_one(tmp_path):
    # `module load cuda/X` often sets only PATH; /usr/local/cuda may be another toolkit.
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch build: setup.py does not look for a toolkit")
    toolkit = _fake_toolkit(tmp_path / "cuda-on-path")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(PATH=f"{toolkit / 'bin'}{os.pathsep}{env.get('PATH', '')}", VLMRM_FAST_FORCE_BUILD="1",
               VLMRM_FAST_CUDA_ARCHS="9.0")
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=copy_sources(tmp_path / "src"), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"building vlmrm_fast._render_cuda (CUDA_HOME={toolkit}," in result.stderr


def _setup_helpers() -> dict:
    """setup.py's functions, without running setup() (it runs only as pip runs it, as __main__)."""
    import runpy

    return runpy.run_path(str(ROOT / "setup.py"), run_name="vlmrm_fast_setup")


def _torch_with_gpus(*capabilities):
    from types import SimpleNamespace

    cuda = SimpleNamespace(is_available=lambda: bool(capabilities), device_count=lambda: len(capabilities),
                           get_device_capability=lambda i: capabilities[i])
    return SimpleNamespace(cuda=cuda)


@pytest.mark.parametrize("given, expected", [
    ("9.0", "9.0+PTX"),
    ("80 90", "8.0;9.0+PTX"),
    ("sm_90a,8.6", "8.6;9.0+PTX;9.0a"),  # PTX for 9.0a would run on 9.0 alone: the portable 9.0's instead
    ("9.0a;9.0", "9.0+PTX;9.0a"),
    ("8.0+PTX;9.0", "8.0+PTX;9.0+PTX"),
    ("90 sm_90 8.0+PTX 80", "8.0+PTX;9.0+PTX"),  # each capability once
    ("Hopper", "Hopper"),  # names go to torch as they are: it expands them for its own toolkit
    ("ampere;HOPPER;Hopper", "Ampere;Hopper"),
    ("Ampere+Tegra 7.5", "7.5;Ampere+Tegra"),
])
def test_cuda_archs_knob_takes_capabilities_and_architecture_names(monkeypatch, given, expected):
    monkeypatch.setenv("VLMRM_FAST_CUDA_ARCHS", given)
    assert _setup_helpers()["_arch_list"](_torch_with_gpus()) == expected


def test_cuda_archs_default_to_torchs_knob_then_the_visible_gpus_then_a_fixed_list(monkeypatch):
    arch_list = _setup_helpers()["_arch_list"]
    monkeypatch.delenv("VLMRM_FAST_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert arch_list(_torch_with_gpus((9, 0), (8, 0), (9, 0))) == "8.0;9.0+PTX"
    assert arch_list(_torch_with_gpus()) == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert arch_list(_torch_with_gpus((9, 0))) is None  # torch's own knob, left to cpp_extension


@pytest.mark.parametrize("given", ["Hoper", "9", "sm_9x", ";", "Hopper+PTX"])
def test_a_cuda_archs_value_that_names_no_capability_is_refused_with_the_accepted_forms(monkeypatch, given):
    monkeypatch.setenv("VLMRM_FAST_CUDA_ARCHS", given)
    with pytest.raises(ValueError, match=r"VLMRM_FAST_CUDA_ARCHS.*(Hopper|names no compute capability)"):
        _setup_helpers()["_arch_list"](_torch_with_gpus())


@pytest.mark.parametrize("given", ["12.0f", "sm_100f", "9.0b+PTX"])
def test_a_cuda_arch_suffix_torchs_builder_refuses_is_refused_here_naming_the_forms_it_takes(monkeypatch, given):
    # "12.0f" passed here and failed in torch's builder, which without VLMRM_FAST_FORCE_BUILD gave a wheel
    # without the extension; torch.utils.cpp_extension takes only "a".
    monkeypatch.setenv("VLMRM_FAST_CUDA_ARCHS", given)
    with pytest.raises(ValueError, match=r"VLMRM_FAST_CUDA_ARCHS: .*takes the suffix 'a' only .*; write \d+\.\d or \d+\.\da"):
        _setup_helpers()["_arch_list"](_torch_with_gpus())


def test_the_arch_list_with_names_is_one_torchs_extension_builder_takes(monkeypatch):
    from torch.utils import cpp_extension

    flags_of = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if flags_of is None:
        pytest.skip("this torch has no _get_cuda_arch_flags to ask")
    monkeypatch.setenv("VLMRM_FAST_CUDA_ARCHS", "sm_80 Hopper")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", _setup_helpers()["_arch_list"](_torch_with_gpus()))
    flags = flags_of()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # Hopper's own +PTX


def test_forcing_and_skipping_the_cuda_build_at_once_is_refused(monkeypatch):
    monkeypatch.setenv("VLMRM_FAST_FORCE_BUILD", "1")
    monkeypatch.setenv("VLMRM_FAST_SKIP_CUDA_BUILD", "1")
    with pytest.raises(ValueError, match="FORCE_BUILD and VLMRM_FAST_SKIP_CUDA_BUILD are both set.*unset one"):
        _setup_helpers()["cuda_extensions"]()


@pytest.mark.parametrize("argv, nothing_compiled", [
    (["sdist", "--formats", "gztar", "--dist-dir", "/tmp/x"], True),  # what build_meta runs for an sdist
    (["egg_info"], True),
    (["dist_info", "--output-dir", "/tmp/x"], True),
    (["bdist_wheel", "--dist-dir", "/tmp/x"], False),
    (["egg_info", "build_ext"], False),
    (["editable_wheel", "--dist-dir", "/tmp/x"], False),
    (["--version"], False),
])
def test_only_metadata_and_sdist_commands_skip_the_extension(argv, nothing_compiled):
    assert _setup_helpers()["_builds_nothing_compiled"](argv) is nothing_compiled


@pytest.mark.parametrize("version, refused", [("59.6.0", True), ("63.4.3", True), ("64.0.0", False), ("80.9.0", False)])
def test_a_setuptools_that_ignores_pyproject_is_refused_not_built_into_an_unknown_wheel(monkeypatch, version, refused):
    # setuptools < 61 reads no [project] table: `pip wheel --no-build-isolation` gave UNKNOWN-0.0.0-py3-none-any.whl.
    import setuptools

    monkeypatch.setattr(setuptools, "__version__", version)
    check = _setup_helpers()["_check_setuptools"]
    if refused:
        with pytest.raises(SystemExit, match=rf"setuptools {version} is older than the 64 .*pip install -U 'setuptools>=64'"):
            check()
    else:
        check()


# ---- the README's Python examples ----

def _readme_python_blocks():
    import re

    text = (ROOT / "README.md").read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


# Examples that need a GPU or downloaded weights run here with the tiny random model on the CPU: the
# same code, these names swapped (the test's, not the README's).
_OFFLINE = {'"ViT-B-32"': '"vlmrm-tiny"', '"laion2b_s34b_b79k"': "None", '"my_checkpoint.pt"': "None",
            'device="cuda"': 'device="cpu"'}


def test_the_readme_has_python_examples_and_each_compiles():
    blocks = _readme_python_blocks()
    assert len(blocks) >= 4
    for line, source in blocks:
        compile(source, f"README.md, the example at line {line}", "exec")


@pytest.mark.parametrize("line, source", [pytest.param(*b, id=f"line-{b[0]}") for b in _readme_python_blocks()])
def test_the_readmes_python_example_runs_in_a_fresh_namespace(line, source):
    import warnings

    if "gym" in source:
        pytest.importorskip("gymnasium")
        pytest.importorskip("mujoco")
        from vlmrm_fast.render import rendering_unavailable_reason

        if rendering_unavailable_reason():
            pytest.skip(rendering_unavailable_reason())
    for name, offline in _OFFLINE.items():
        source = source.replace(name, offline)
    assert "laion" not in source and '"cuda"' not in source, "an example the offline swaps above do not cover"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tiny model's "random weights"
        exec(compile(source, f"README.md, the example at line {line}", "exec"), {"__name__": "__readme__"})
