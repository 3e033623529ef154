"""The AOTInductor backend (``backend="aoti"``): ``torch.export`` -> AOTInductor -> a ``.pt2`` package.

compile: jitfreeze's traced graph (flat tensors in, pre-dispatch, weights as constants) is exported
non-strict, its symbolic dims as ``Dim.AUTO`` (checked to stay symbolic), and compiled by
``torch._inductor.aoti_compile_and_package`` under ``no_grad``: Inductor freezes (folds
constants, prepacks weights for mkldnn) only with grad off. The package's bytes are the artifact.

load: ``torch._C._aoti.AOTIModelPackageLoader`` is constructed directly. ``aoti_load_package``
compiles ISA probes with g++ in every fresh process, only to compare them with the package's
metadata for a warning (torch 2.13: 6.3 s here, 2.9-10.6 s upstream, issue 191715) -- the key already
names the CPU. The loader unzips the package's model folder under ``$TMPDIR``; on CPU that is pointed
at a private directory which is removed as soon as the loader is built (the shared library is mapped
by then and nothing reads the files again), so nothing is left behind, even when the process is
killed later. On GPU the loader reads kernels from there later: its destructor removes it.

Measured on 2026-12-03 (torch 2.13 CPU, 2 shared cores, g++ 12; docs/backends.md): compile 12-23 s
per small model (the first on a machine: +20 s of Inductor's precompiled headers), load 3-9 ms,
steady per call 0.5-1.1x the TorchScript backend's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
import zipfile

import torch

from ..errors import FallbackReason
from ..key import tensor_layout
from .base import EagerIsFaster, NoCompiler, SavedArtifact, bound_tensor, room_for
from .tuning import choose

__all__ = ["AOTIBackend", "AOTIPackage", "compiler_version", "host_text"]

log = logging.getLogger("jitfreeze")

_LOAD_LOCK = threading.Lock()       # $TMPDIR is process-wide: one loader construction at a time
_COMPILE_LOCK = threading.Lock()    # Inductor's configs and warning filters are process-wide too
_META = "jitfreeze"                 # our record in the package's metadata (aot_inductor.metadata)
_FORMAT = 1
_CONSTANTS = "jitfreeze/constants.pt"   # a binding package's own constants (torch.save, weights_only at load)
_TUNED = "jitfreeze/tuned.json"         # written only where eager timed faster than the package


def _compiler() -> str:
    """The C++ compiler Inductor would use: ``$CXX``, else ``g++`` (``torch._inductor.config.cpp.cxx``)."""
    return os.environ.get("CXX") or "g++"


@functools.cache
def compiler_version() -> str | None:
    """``"g++: g++ (Debian 12.2.0-14+deb12u1) 12.2.0"`` (the compiler and the first line of its
    ``--version``), or None when it does not run. One subprocess per process (3-30 ms);
    ``cache_clear()`` after changing ``CXX``."""
    cxx = _compiler()
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("jitfreeze: no C++ compiler: %s --version: %s", cxx, exc)
        return None
    lines = out.strip().splitlines()
    return f"{cxx}: {lines[0] if lines else '?'}"


@functools.cache
def _cpu_text() -> str:
    """What Inductor's CPU code depends on, without its g++ probes (0.5 ms): the vector ISA it
    picks from (the same ``torch.cpu`` checks, and ``ATEN_CPU_CAPABILITY``) and, because it compiles
    with ``-march=native`` by default, the CPU's identity and feature flags (/proc/cpuinfo's first
    processor: vendor, family, model, and a digest of its flags)."""
    machine = platform.machine()
    isa: list = []
    if machine in ("x86_64", "AMD64"):
        for name, check in (("avx2", "_is_avx2_supported"), ("avx512", "_is_avx512_supported"),
                            ("vnni", "_is_vnni_supported"), ("amx", "_is_amx_tile_supported")):
            with contextlib.suppress(Exception):
                if getattr(torch.cpu, check)():
                    isa.append(name)
    elif machine in ("aarch64", "arm64"):
        with contextlib.suppress(Exception):
            isa = sorted(k for k, v in torch.cpu.get_capabilities().items() if v is True)
    ident, flags = [], ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break                      # the first processor's block
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k in ("vendor_id", "cpu family", "model", "CPU implementer", "CPU architecture", "CPU part"):
                    ident.append(v)
                elif k in ("flags", "Features"):
                    flags = hashlib.sha256(" ".join(sorted(v.split())).encode()).hexdigest()[:16]
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "")
    return (f"{machine} {'/'.join(ident) or '?'} isa={','.join(isa) or 'none'}"
            + (f" ATEN_CPU_CAPABILITY={cap}" if cap else "") + f" flags={flags or '?'}")


def host_text() -> str:
    """The machine's part of an AOTI key: the CPU (cached per process). Not the compiler: a package
    is a shared library for this CPU, and it loads without one (a serving machine needs no g++);
    the compiler that built it is recorded in its metadata."""
    return f"cpu={_cpu_text()}"


class AOTIPackage:
    """A loaded package: its loader, whether the graph returns one bare tensor, and the tensors
    handed to the loader as its constants (kept here: the loader holds their pointers, not them,
    and the module may let go of them -- ``p.data = ...``, ``discard_parameters=True``)."""

    __slots__ = ("loader", "single", "constants")

    def __init__(self, loader, single: bool, constants: dict | None = None):
        self.loader = loader
        self.single = single
        self.constants = constants or {}


class AOTIBackend:
    """torch.export + AOTInductor. The same interface as
    :class:`~jitfreeze.backend.torchscript.TorchScriptBackend`; ``load`` returns an :class:`AOTIPackage`.

    Weights: the module's own tensors are frozen into the package (folded and prepacked into its
    shared library) or, from a size on, bound at load: the package is compiled unfrozen and without
    them (``package_constants_in_so=False``) and the module's tensors are handed to the loader
    (``load_constants(..., user_managed=True)``: shared, no copy). Where most of the weights' bytes
    feed convolutions they bind from :attr:`CONV_BIND_MIN_BYTES`, otherwise from :attr:`BIND_MIN_BYTES`
    (:meth:`bindings`). Measured 2026-12-03 (1 thread, 2 shared cores; docs/backends.md):

    * freezing pays most on convolutions (conv+BN net 0.20x eager per call, MobileNetV2 0.18x the
      TorchScript backend) and on small linear stacks (MLP 0.72x unfrozen, 100 MB of linears 0.74x);
    * on transformers it lost: frozen 1.34x the TorchScript backend per call (DistilBERT, batch
      1 x 128), 1.28x (BERT-base), bound 0.97x and 1.03x; and a frozen package is the weights again
      (266 / 440 MB on disk per signature, loaded in 0.37-0.41 / 0.63-0.83 s, peak RSS 1112 / 1610 MB)
      where a bound one is 2 MB, loads in 6-11 ms (RSS 605 / 776 MB). Warm first call in a fresh
      process: DistilBERT 0.77-0.85 s frozen, 0.38 s bound; BERT 1.38-1.79 s, 0.53-0.59 s;
    * ConvNeXt-tiny (106 MiB, 7% of it convolution weights) the same way: 1.04x frozen, 0.88x bound.

    So a transformer-size model binds; a conv net keeps its frozen weights up to 256 MiB (ResNet-50's 90 MiB
    included)."""

    BIND_MIN_BYTES = 64 * 2**20          # weights that mostly feed linears, matmuls, anything else
    CONV_BIND_MIN_BYTES = 256 * 2**20    # weights that mostly feed convolutions

    def __init__(self, optimize: bool = True):
        self.optimize = optimize
        self._name: str | None = None

    @property
    def name(self) -> str:
        """The backend's part of every key: this recipe's version, freezing and the CPU (torch's
        version is in every key already; the compiler is not: see :func:`host_text`)."""
        if self._name is None:
            self._name = f"aoti-{_FORMAT}{'+freeze' if self.optimize else ''}; {host_text()}"
        return self._name

    def bindings(self, traced, names: dict) -> dict:
        """``names`` ({graph attribute: the module's name}) when those weigh at least
        :attr:`BIND_MIN_BYTES` -- :attr:`CONV_BIND_MIN_BYTES` where at least half of their bytes are
        convolutions' operands -- else none (frozen into the package)."""
        if not names:
            return {}
        sizes = {a: t.untyped_storage().nbytes() for a, t in traced.constants if a in names}
        size = sum(sizes.values())
        if size < min(self.BIND_MIN_BYTES, self.CONV_BIND_MIN_BYTES):
            return {}
        conv = sum(sizes.get(n.target, 0) for n in traced.graph_module.graph.nodes
                   if n.op == "get_attr" and any(_is_conv(u) for u in n.users))
        limit = self.CONV_BIND_MIN_BYTES if 2 * conv >= size else self.BIND_MIN_BYTES
        return dict(names) if size >= limit else {}

    # -- compile -------------------------------------------------------------------------------

    def compile(self, traced, path: str | None = None, bindings: dict | None = None,
                example: list | None = None, tune: bool = True) -> SavedArtifact:
        """Export and compile ``traced`` for the call's inputs ``example`` (not modified); the
        package is written to ``path`` (or a temporary file: see :class:`SavedArtifact`).
        With ``tune`` (``JITFREEZE_TUNE``) the package is timed against eager on ``example``
        (:func:`jitfreeze.backend.tuning.choose`; one compiled form, no variants); where eager is
        faster, the package records it and :meth:`load` raises :class:`EagerIsFaster`."""
        bindings = bindings or {}
        if compiler_version() is None:
            raise NoCompiler(
                f"backend 'aoti' needs a C++ compiler to compile and found none ({_compiler()!r} does not run; "
                "install g++ or set CXX to a C++ compiler), or use backend='torchscript'")
        if example is None:
            raise FallbackReason("backend 'aoti' needs the call's inputs to export the graph")
        gm = traced.graph_module
        dynamic = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                shape = getattr(node.meta.get("val"), "shape", ())
                dynamic.append([d for d, s in enumerate(shape)
                                if isinstance(s, torch.SymInt) and s.node.maybe_as_int() is None])
        layouts = dict(traced.constants)
        record = [[attr, name, *tensor_layout(layouts[attr])] for attr, name in bindings.items()]
        single = bool(traced.out_spec.is_leaf() and tuple(traced.out_tensor_idx) == (0,))
        frozen = self.optimize and not bindings
        stored = bool(bindings) and any(a not in bindings for a, _ in traced.constants)
        configs = {"freezing": frozen,
                   "aot_inductor.metadata": {_META: json.dumps({"format": _FORMAT, "cxx": compiler_version(),
                                                                "frozen": frozen, "bindings": record,
                                                                "stored": stored, "single": single})}}
        if bindings:
            configs["aot_inductor.package_constants_in_so"] = False
        inside = sum(t.untyped_storage().nbytes() for a, t in traced.constants if a not in bindings)
        estimate = inside + inside // 8 + 16 * 2**20      # the weights, the shared library, the zip
        ds = tuple({d: torch.export.Dim.AUTO for d in dims} for dims in dynamic) if any(dynamic) else None
        with _COMPILE_LOCK, warnings.catch_warnings():
            # Inductor's imports and passes warn (TorchScript deprecation, export notes): not the caller's concern.
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
            try:
                with torch.no_grad():
                    ep = torch.export.export(gm, tuple(example), dynamic_shapes=ds, strict=False)
            except Exception as exc:  # noqa: BLE001 - what export refuses runs eagerly, with the reason
                raise FallbackReason(f"torch.export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
            _check_dynamic(ep, dynamic)
            saved = _package(ep, path, configs, estimate)
        if stored:
            # The package holds no constants at all then: the ones that are not the module's (a
            # closure's tensors, literals, hoisted numbers) go into it as a file of their own.
            try:
                buffer = io.BytesIO()
                torch.save({a: t.detach() for a, t in traced.constants if a not in bindings}, buffer)
                with zipfile.ZipFile(saved.path, "a") as z:
                    z.writestr(_CONSTANTS, buffer.getvalue())
            except Exception:
                saved.remove()
                raise
        if tune:
            self._tune(saved, traced, bindings, example)
        return saved

    def _tune(self, saved: SavedArtifact, traced, bindings: dict, example: list) -> None:
        weights = {bindings[attr]: t for attr, t in traced.constants if attr in bindings}
        try:
            run = self.runner(self.load(saved, example[0].device if example else None, weights))
        except Exception as exc:  # noqa: BLE001 - loading it back is checked (and reported) by the caller
            log.debug("jitfreeze: package not timed (%s)", exc)
            return
        choice = choose("aoti", {"aoti": run}, traced.graph_module, example)
        if choice.eager:
            with zipfile.ZipFile(saved.path, "a") as z:
                z.writestr(_TUNED, json.dumps(choice.record()))

    # -- load and run --------------------------------------------------------------------------

    def load(self, data, device: torch.device | None, weights: dict | None = None) -> AOTIPackage:
        """bytes (or a verified file: anything with ``.path``; the envelope after the zip is fine,
        zip readers skip it) -> an :class:`AOTIPackage`. ``weights``: the module's tensors by name,
        for packages that bind them; :class:`BindingError` when they don't fit."""
        tuned = _tuned(getattr(data, "path", None) or data)
        if tuned.get("eager"):
            raise EagerIsFaster(tuned)
        gpu = device is not None and device.type != "cpu"
        index = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else -1
        path = getattr(data, "path", None)
        with _LOAD_LOCK, _scratch(extract_here=not gpu) as tmp:
            if path is None:
                path = os.path.join(tmp, "package.pt2")
                with open(path, "wb") as f:
                    f.write(data)
            loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, index)
        record = json.loads(loader.get_metadata().get(_META) or "{}")
        if record.get("format") != _FORMAT:
            raise RuntimeError("not a package of this jitfreeze version (its jitfreeze metadata is missing or other)")
        bound = record.get("bindings") or []
        needed = set(loader.get_constant_fqns()) if bound else set()
        constants: dict = {}
        if bound:
            if record.get("stored"):
                constants = _stored_constants(getattr(data, "path", None) or data)
            for attr, name, *layout in bound:
                constants[attr] = bound_tensor(weights, name, layout, "package")
            if needed - set(constants):
                # A package run with constants missing crashes the process (seen: SIGSEGV): refuse it.
                raise RuntimeError(f"the package needs constants it does not bind: {sorted(needed - set(constants))[:5]}")
            constants = {k: v for k, v in constants.items() if k in needed}
            loader.load_constants(constants, False, True, True)
        return AOTIPackage(loader, bool(record.get("single")), constants)

    def first_call(self, module: AOTIPackage, tensors):
        """Call a loaded package once: (its outputs, the function to call it with)."""
        run = self.runner(module)
        return run(*tensors), run

    def runner(self, module: AOTIPackage):
        """Tensors in, the graph's outputs out (the bare tensor where the graph returns one). The
        function holds the package: the loader lives as long as the entry that calls it."""
        loader_run = module.loader.run
        if module.single:
            def run(*tensors):
                return loader_run(list(tensors))[0]
        else:
            def run(*tensors):
                return loader_run(list(tensors))
        run.package = module
        return run


_CONV = re.compile(r"(^|_)conv(\d|_|olution|$)")     # conv2d, conv_transpose2d, convolution, mkldnn_convolution


def _is_conv(node) -> bool:
    """Whether an FX node calls a convolution (``aten.conv2d``, ``aten.convolution.default``, ...;
    not ``convert_element_type``)."""
    parts = str(node.target).split(".")
    return node.op == "call_function" and len(parts) > 1 and _CONV.search(parts[1]) is not None


def _tuned(source) -> dict:
    """The timing record :meth:`AOTIBackend._tune` wrote into the package (:data:`_TUNED`), or {}."""
    with zipfile.ZipFile(source if isinstance(source, str) else io.BytesIO(source)) as z:
        return json.loads(z.read(_TUNED)) if _TUNED in z.namelist() else {}


def _stored_constants(source) -> dict:
    """The constants a binding package carries itself (:data:`_CONSTANTS`, written by ``compile``):
    ``source`` is its path (a cache file: zip readers skip the envelope after the zip) or its bytes."""
    with zipfile.ZipFile(source if isinstance(source, str) else io.BytesIO(source)) as z:
        data = z.read(_CONSTANTS)
    return torch.load(io.BytesIO(data), weights_only=True)


def _check_dynamic(ep, dynamic) -> None:
    """torch.export must keep symbolic what jitfreeze's trace kept symbolic (``Dim.AUTO`` may
    specialize): a package compiled for one size must not serve others."""
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    for j, (spec, dims) in enumerate(zip(inputs, dynamic)):
        val = nodes[spec.arg.name].meta.get("val")
        for d in dims:
            if not isinstance(val.shape[d], torch.SymInt):
                raise FallbackReason(f"torch.export made dim {d} of tensor input {j} static ({val.shape[d]}) "
                                     "where jitfreeze's trace kept it dynamic")


def _package(ep, path: str | None, configs: dict, estimate: int) -> SavedArtifact:
    """aoti_compile_and_package into ``path`` (a cache file), or into a temporary file when there
    is none or no room there."""
    error = None
    if path is not None and not room_for(path, estimate):
        error = OSError(errno.ENOSPC, f"no room for a {estimate / 1e6:.1f} MB package", os.path.dirname(path))
        with contextlib.suppress(OSError):
            os.unlink(path)
        path = None
    if path is None:
        fd, path = tempfile.mkstemp(prefix="jitfreeze-", suffix=".pt2")
        os.close(fd)
        if not room_for(path, estimate):
            os.unlink(path)
            raise FallbackReason(f"no room to save the AOTInductor package ({estimate / 1e6:.1f} MB) in "
                                 f"{os.path.dirname(path)}")
    try:
        # aoti_compile_and_package takes a name ending in .pt2, or a writable, seekable file.
        with open(path, "w+b") as f, torch.no_grad():
            torch._inductor.aoti_compile_and_package(ep, package_path=f, inductor_configs=configs)
    except Exception as exc:  # noqa: BLE001 - a compile that fails runs eagerly, with the reason
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise _compile_error(exc) from exc
    return SavedArtifact(path, error)


@contextlib.contextmanager
def _scratch(extract_here: bool):
    """A private directory for the duration of a loader's construction, removed after. With
    ``extract_here`` it is also ``$TMPDIR`` meanwhile, where the loader extracts the package."""
    tmp = tempfile.mkdtemp(prefix="jitfreeze-aoti-")
    old = os.environ.get("TMPDIR")
    if extract_here:
        os.environ["TMPDIR"] = tmp
    try:
        yield tmp
    finally:
        if extract_here:
            if old is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def _compile_error(exc: BaseException) -> FallbackReason:
    """What a failed compile means: :class:`NoCompiler` where Inductor found no C++ compiler."""
    c, seen = exc, 0
    while c is not None and seen < 8:
        if type(c).__name__ == "InvalidCxxCompiler":
            return NoCompiler(f"backend 'aoti' needs a C++ compiler and Inductor found none ({_first_line(c)}); "
                              "install g++ or set CXX, or use backend='torchscript'")
        c, seen = c.__cause__ or c.__context__, seen + 1
    return FallbackReason(f"AOTInductor compile failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
