"""Build script: metadata lives in pyproject.toml; this file adds the optional CUDA extension.

The extension ``vlmrm_fast._render_cuda`` (csrc/gl_cuda_readback.cpp) reads MuJoCo's OpenGL frames
into CUDA memory without a trip through the host (vlmrm_fast.render.BatchRenderer's GPU path). It is
optional: without it the package is pure Python and BatchRenderer renders on the CPU path.

Environment knobs (flash-attention style):

- ``VLMRM_FAST_SKIP_CUDA_BUILD=1``: never build the extension.
- ``VLMRM_FAST_FORCE_BUILD=1``: build even when no GPU is visible (CUDA toolkit still needed),
  e.g. in a wheel-building container; a failed forced build is an error (and so is setting both).
  An sdist (and the metadata pip asks for first) compiles nothing, so neither knob affects it.
- ``VLMRM_FAST_CUDA_ARCHS="8.0;9.0"``: compute capabilities to compile device code for (as
  ``TORCH_CUDA_ARCH_LIST``; "80 90", "sm_90", "9.0a", "+PTX" and torch's architecture names such as
  "Ampere;Hopper" are understood). Default: ``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs'
  capabilities, else "8.0;9.0"; the newest is also compiled as PTX, in its portable form ("9.0a" adds
  "9.0+PTX"), so that newer GPUs can compile it when it loads. The extension today is host code calling the CUDA runtime (no kernels
  of its own), so its one build runs on every GPU the torch it was built against supports; the list
  matters once device code is added.

By default the extension is built only when torch is importable in the build environment (e.g.
``pip install -e . --no-build-isolation``), ``torch.cuda.is_available()`` and the CUDA toolkit (nvcc)
is found. Otherwise a one-line note is printed and the install is pure Python, as it is when such a
default build fails to compile (the wheel is then ``py3-none-any``, with no extension left from an
earlier build). The toolkit is ``CUDA_HOME`` (or ``CUDA_PATH``), else the one whose nvcc comes first on
PATH, else /usr/local/cuda.
"""
import os
import re
import shutil
import sys

from setuptools import setup

EXT_NAME = "vlmrm_fast._render_cuda"
SOURCES = ["csrc/gl_cuda_readback.cpp"]


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _note(msg):
    print(f"vlmrm_fast setup: {msg}", file=sys.stderr)


_ARCH = re.compile(r"^(?:sm_|compute_)?(\d+?)\.?(\d)([a-z]?)(\+ptx)?$", re.IGNORECASE)
# Architecture names handed to TORCH_CUDA_ARCH_LIST as they are: the torch building the extension expands
# them to the capabilities its own toolkit supports (an older torch may not know the newer names).
_ARCH_NAMES = ("Kepler+Tesla", "Kepler", "Maxwell+Tegra", "Maxwell", "Pascal", "Volta+Tegra", "Volta", "Turing",
               "Ampere+Tegra", "Ampere", "Ada", "Hopper", "Blackwell+Tegra", "Blackwell", "Rubin")


def _arch_list(torch):
    """TORCH_CUDA_ARCH_LIST for the build ("8.0;9.0+PTX"), or None to leave torch's own setting."""
    archs = os.environ.get("VLMRM_FAST_CUDA_ARCHS", "").strip()
    if not archs:
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):
            return None  # torch's own knob, honoured by cpp_extension
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            archs = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            archs = "8.0;9.0"
    names = {name.lower(): name for name in _ARCH_NAMES}
    capabilities, named = {}, []
    for token in re.split(r"[;,\s]+", archs):
        if not token:
            continue
        if token.lower() in names:
            named.append(names[token.lower()])
            continue
        match = _ARCH.match(token)
        if match is None:
            raise ValueError(f"VLMRM_FAST_CUDA_ARCHS: {token!r} is not a compute capability such as 8.0, 90, sm_90, "
                             f"9.0a or 9.0+PTX, nor an architecture name ({', '.join(_ARCH_NAMES)})")
        major, minor, suffix, ptx = match.groups()
        if suffix.lower() not in ("", "a"):
            # torch.utils.cpp_extension takes "a" (arch-specific) only: "12.0f" (family) failed there, and
            # without VLMRM_FAST_FORCE_BUILD that build gave a wheel without the extension.
            raise ValueError(f"VLMRM_FAST_CUDA_ARCHS: {token!r}: torch's extension builder takes the suffix 'a' "
                             f"only (such as 9.0a), not {suffix!r}; write {major}.{minor} or {major}.{minor}a")
        key = (int(major), int(minor), suffix.lower())
        capabilities[key] = capabilities.get(key, False) or bool(ptx)
    if not capabilities and not named:
        raise ValueError(f"VLMRM_FAST_CUDA_ARCHS={archs!r} names no compute capability")
    # The newest also as PTX, so that newer GPUs can compile it at load time (names carry their own). In
    # its portable form: PTX for an arch-specific "9.0a" runs on that architecture alone.
    if capabilities and not named:
        major, minor, _ = max(capabilities)
        capabilities[(major, minor, "")] = True
    numbers = [f"{a}.{b}{s}" + ("+PTX" if ptx else "") for (a, b, s), ptx in sorted(capabilities.items())]
    return ";".join(numbers + list(dict.fromkeys(named)))


#: setup.py commands that build or install nothing compiled: the extension is not tried for them (an sdist
#: holds its source whatever the machine can build), and VLMRM_FAST_FORCE_BUILD does not fail them.
_METADATA_COMMANDS = {"sdist", "egg_info", "dist_info"}
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist", "bdist_egg", "install", "develop", "editable_wheel"}


def _builds_nothing_compiled(argv):
    """Whether setup.py's command line (``sys.argv``) only writes metadata or a source distribution."""
    return bool(_METADATA_COMMANDS & set(argv)) and not _BUILD_COMMANDS & set(argv)


def cuda_extensions():
    """The extension list and cmdclass, or ([], {}) with a printed reason."""
    force = _truthy("VLMRM_FAST_FORCE_BUILD")
    if force and _truthy("VLMRM_FAST_SKIP_CUDA_BUILD"):
        raise ValueError("VLMRM_FAST_FORCE_BUILD and VLMRM_FAST_SKIP_CUDA_BUILD are both set, and contradict each "
                         "other: unset one (FORCE builds the CUDA extension, SKIP installs without it)")
    if _truthy("VLMRM_FAST_SKIP_CUDA_BUILD"):
        _note("VLMRM_FAST_SKIP_CUDA_BUILD is set: pure-Python install, no CUDA extension")
        return [], {}
    try:
        import torch
    except ImportError:
        msg = ("torch is not importable in the build environment (build isolation?): no CUDA extension; "
               "to build it, install torch first and run pip with --no-build-isolation "
               "(`pip install -e . --no-build-isolation`, `pip wheel --no-deps --no-build-isolation -w dist .`)")
        if force:
            raise RuntimeError("VLMRM_FAST_FORCE_BUILD: " + msg)
        _note(msg)
        return [], {}
    if torch.version.cuda is None:
        msg = f"torch {torch.__version__} is a CPU-only build: no CUDA extension"
        if force:
            raise RuntimeError("VLMRM_FAST_FORCE_BUILD: " + msg)
        _note(msg)
        return [], {}
    if not (torch.cuda.is_available() or force):
        _note("no CUDA device visible (set VLMRM_FAST_FORCE_BUILD=1 to build anyway): no CUDA extension")
        return [], {}
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        home = _toolkit_of_nvcc_on_path() or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
        if home is not None:
            os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        msg = (f"the CUDA toolkit (nvcc, CUDA_HOME) was not found (CUDA_HOME={cpp_extension.CUDA_HOME}; set it to the "
               "toolkit's folder, the one holding bin/nvcc, or put that nvcc first on PATH): no CUDA extension")
        if force:
            raise RuntimeError("VLMRM_FAST_FORCE_BUILD: " + msg)
        _note(msg)
        return [], {}
    archs = _arch_list(torch)
    if archs is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    _note(f"building {EXT_NAME} (CUDA_HOME={cpp_extension.CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    ext = cpp_extension.CUDAExtension(
        name=EXT_NAME,
        sources=SOURCES,
        extra_compile_args={"cxx": ["-O2"]},
        extra_link_args=["-Wl,--strip-debug"],  # Python's CFLAGS add -g: 12 MB of debug info otherwise
        libraries=["dl"],
    )

    class BuildExt(cpp_extension.BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            # setuptools skips an extension whose output in build/ is newer than its sources, though
            # torch, the toolkit or the flags changed since (torch forces a rebuild only with ninja): a
            # wheel must not ship a library built against another torch. One source file: cheap.
            self.force = True

        def run(self):
            try:
                super().run()
            except Exception as exc:  # an optional extension must not break a default install
                if force:
                    raise
                _note(f"building {EXT_NAME} failed, installing without it: {exc}")
                self._install_without_extensions()

        def _install_without_extensions(self):
            # An output of an earlier build must not ship in place of the one that failed, and a wheel
            # without the extension is pure Python: say so in its tag (py3-none-any), not a platform one.
            # An editable install imports the copy an earlier build left in the source tree: remove it too.
            build_py = self.get_finalized_command("build_py")
            for extension in self.extensions:
                outputs = [self.get_ext_fullpath(extension.name)]
                if getattr(self, "editable_mode", False):
                    package = extension.name.rpartition(".")[0]
                    filename = os.path.basename(self.get_ext_filename(extension.name))
                    outputs.append(os.path.join(build_py.get_package_dir(package), filename))
                for output in outputs:
                    if os.path.exists(output):
                        os.remove(output)
            self.distribution.ext_modules = []
            wheel = self.distribution.command_obj.get("bdist_wheel")
            if wheel is not None:
                wheel.root_is_pure = True

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=_has_ninja())}


def _toolkit_of_nvcc_on_path():
    """The CUDA toolkit whose nvcc comes first on PATH (``module load cuda`` often sets only PATH), or None.

    Unlike torch's own search, an nvcc that is a wrapper or link outside its toolkit (/usr/local/bin/nvcc)
    does not make its parent folder the toolkit: that folder must hold the CUDA headers.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    for path in (nvcc, os.path.realpath(nvcc)):
        home = os.path.dirname(os.path.dirname(path))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _has_ninja():
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return is_ninja_available()
    except Exception:
        return False


def _license() -> dict:
    """The licence in the form this setuptools takes: an SPDX expression from 77 on (its table form in
    pyproject.toml stops building in 2027), the plain field before (pyproject can hold only one form)."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "MIT"} if major >= 77 else {"license": "MIT"}


def _clean_build_py():
    """build_py that first empties the package's folder in build/: setuptools never removes what an earlier
    build copied there, so a module deleted or renamed since (a `git pull` in the same checkout) would ship."""
    from setuptools.command.build_py import build_py

    class CleanBuildPy(build_py):
        def run(self):
            stale = os.path.join(self.build_lib, "vlmrm_fast")
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            super().run()

    return CleanBuildPy


def _check_setuptools():
    """pyproject.toml's [build-system] asks for setuptools >= 64 (PEP 660 editable installs), which pip's
    --no-build-isolation does not check: one older than 61 ignores the [project] table and builds an empty
    wheel named UNKNOWN-0.0.0, without an error."""
    import setuptools

    try:
        version = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    except ValueError:
        return
    if version < (64, 0):
        raise SystemExit(f"vlmrm_fast setup: setuptools {setuptools.__version__} is older than the 64 this project's "
                         "build needs (pyproject.toml; before 61 it builds an empty wheel named UNKNOWN): "
                         "pip install -U 'setuptools>=64' wheel, then build again")


if __name__ == "__main__":  # as pip and setuptools run it; tests import its helpers
    _check_setuptools()
    ext_modules, cmdclass = ([], {}) if _builds_nothing_compiled(sys.argv[1:]) else cuda_extensions()
    setup(ext_modules=ext_modules, cmdclass={"build_py": _clean_build_py(), **cmdclass}, **_license())
