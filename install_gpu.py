"""Install for NVIDIA GPUs: requirements.txt plus the GPU set pinned in requirements-gpu.txt
(onnxruntime-gpu with CUDA and cuDNN from pip, and TensorRT from pip), leaving onnxruntime-gpu as
the only ONNX Runtime. Safe to run again, also after `pip install -r requirements.txt`.

    python install_gpu.py                # CUDA 13 (driver 580 or newer): requirements-gpu.txt
    python install_gpu.py --cuda 12      # CUDA 12 drivers: requirements-gpu-cuda12.txt
    python install_gpu.py --system-libs  # only onnxruntime-gpu: CUDA, cuDNN, TensorRT of the system

Run it with the Python of the environment to install into (.venv/bin/python on Linux,
.venv\\Scripts\\python on Windows); it installs with that Python's pip.

Why a script: insightface requires the CPU package `onnxruntime`, which installs the same
`onnxruntime` module folder as `onnxruntime-gpu`; with both installed the CPU build can win, and
removing one deletes files of the other. So pip resolves requirements.txt and the GPU set together
(a dry run), and this script installs what pip chose except the CPU onnxruntime, with --no-deps so
that pip does not add it back. TensorRT's PyPI packages download their wheels from NVIDIA's own
package index while they install, so they cannot take part in a dry run: they are installed last.
Nothing is uninstalled before everything is resolved and the GPU build's wheel is on the disk:
a network failure before that changes nothing, and after it the GPU build is installed from that
file, so an environment is never left without an ONNX Runtime.
Exit code: 0 installed and checked, 1 installed but the check found a problem (or TensorRT could
not be installed), 2 nothing could be installed (this Python or platform, or pip failed).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
CPU_REQUIREMENTS = REPO / "requirements.txt"
GPU_REQUIREMENTS = {"13": REPO / "requirements-gpu.txt", "12": REPO / "requirements-gpu-cuda12.txt"}
ONNXRUNTIME_BUILDS = ("onnxruntime", "onnxruntime-gpu")  # CPU, GPU: one module folder
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
MIN_PYTHON = (3, 11)  # onnxruntime-gpu 1.24 and later (every pinned GPU set)
MIN_PIP = (22, 2)  # pip install --dry-run --report

_CHECK_CODE = """\
import json, importlib.metadata as metadata
builds = {}
for name in %r:
    try:
        builds[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
try:
    import onnxruntime
    providers, error = onnxruntime.get_available_providers(), None
except Exception as exc:
    providers, error = [], f"{type(exc).__name__}: {exc}"
print(json.dumps({"builds": builds, "providers": providers, "error": error}))
""" % (ONNXRUNTIME_BUILDS,)


def parse_args(argv=None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", choices=sorted(GPU_REQUIREMENTS), default="13",
                        help="CUDA major of the GPU set (13 needs NVIDIA driver 580 or newer)")
    parser.add_argument("--system-libs", action="store_true",
                        help="install only onnxruntime-gpu, no CUDA, cuDNN or TensorRT wheels: "
                             "the system's libraries are used (they must be on the library path)")
    return parser.parse_args(argv)


def canonical_name(name: str) -> str:
    """Return a distribution name as pip compares it: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path) -> list:
    """Return the requirement lines of a requirements file, without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def requirement_name(line: str) -> str:
    """Return the canonical distribution name a requirement line names ('onnxruntime-gpu'), or ''
    for a line that names none (a pip option)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return canonical_name(match.group(0)) if match else ""


def split_gpu_set(lines: list, system_libs: bool) -> tuple:
    """Return (lines pip resolves with requirements.txt, TensorRT lines installed after them).
    With system_libs only onnxruntime-gpu is kept, without its [cuda,cudnn] extras."""
    if system_libs:
        return [re.sub(r"\[[^\]]*\]", "", line) for line in lines
                if requirement_name(line) == "onnxruntime-gpu"], []
    tensorrt = [line for line in lines if requirement_name(line).startswith("tensorrt")]
    return [line for line in lines if line not in tensorrt], tensorrt


def builds_to_remove(installed: dict) -> list:
    """Return the ONNX Runtime builds to uninstall before installing: both when the CPU one is
    installed (removing either deletes files the other shares), else none."""
    if "onnxruntime" not in installed:
        return []
    return [name for name in ONNXRUNTIME_BUILDS if name in installed]


def pins_to_install(report: dict) -> list:
    """Return 'name==version' for each package of pip's dry-run report except the CPU onnxruntime."""
    pins = []
    for item in report.get("install", []):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if canonical_name(name) != "onnxruntime":
            pins.append(f"{name}=={version}")
    return pins


def pip(args: list, capture: bool = False) -> subprocess.CompletedProcess:
    """Run this Python's pip with args; raise SystemExit(2) naming the command when it fails."""
    command = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(command, capture_output=capture, text=True, timeout=3600)
    if done.returncode != 0:
        detail = (done.stderr or "").strip()[-3000:] if capture else "(pip's error is above)"
        print(f"[!] failed (exit code {done.returncode}): {' '.join(command)}\n{detail}")
        raise SystemExit(2)
    return done


def installed_builds() -> dict:
    """Return {distribution: version} of the ONNX Runtime builds installed, read from their
    metadata in this process (a broken onnxruntime cannot hide them)."""
    import importlib
    from importlib import metadata
    importlib.invalidate_caches()
    builds = {}
    for name in ONNXRUNTIME_BUILDS:
        try:
            builds[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return builds


def gpu_build_pin(pins: list, resolved: list) -> str:
    """Return the 'onnxruntime-gpu==X' to install: from pip's plan, or from the GPU set's own line
    when pip plans nothing for it (it is installed already, but is about to be uninstalled)."""
    for pin in pins + [re.sub(r"\[[^\]]*\]", "", line) for line in resolved]:
        if requirement_name(pin) == "onnxruntime-gpu" and "==" in pin:
            return pin
    raise SystemExit("[!] the GPU set pins no onnxruntime-gpu==<version>: see requirements-gpu.txt")


def fetch_gpu_build(pin: str, folder: str) -> None:
    """Download the GPU build's wheel (only it) into folder, before anything is uninstalled."""
    print(f"[*] downloading {pin} first, so that it can be installed without the network")
    pip(["download", "--quiet", "--no-deps", "--dest", folder, pin])


def installed_state() -> dict:
    """Return {"builds": {distribution: version} of the ONNX Runtime builds installed,
    "providers": what onnxruntime lists, "error": why it cannot be imported or None}, as a fresh
    interpreter sees them (after any change)."""
    done = subprocess.run([sys.executable, "-c", _CHECK_CODE], capture_output=True, text=True)
    if done.returncode != 0:
        return {"builds": {}, "providers": [], "error": done.stderr.strip()[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def resolve(requirements: list) -> dict:
    """Return pip's dry-run report of installing requirements (pip arguments) into this
    environment: what it would install or upgrade, resolved as one set."""
    with tempfile.TemporaryDirectory(prefix="install-gpu-") as folder:
        report = Path(folder) / "report.json"
        pip(["install", "--dry-run", "--quiet", "--report", str(report), *requirements])
        return json.loads(report.read_text(encoding="utf-8"))


def unsupported_here() -> str | None:
    """Return why this Python or platform cannot have the GPU build, or None."""
    if sys.platform not in ("linux", "win32"):
        return (f"onnxruntime-gpu is built for Linux and Windows, not {sys.platform}: install the "
                f"CPU build with pip install -r requirements.txt")
    if sys.version_info < MIN_PYTHON:
        return (f"the pinned onnxruntime-gpu builds need Python {'.'.join(map(str, MIN_PYTHON))} or "
                f"newer, this is {sys.version.split()[0]} ({sys.executable}): make the virtual "
                f"environment with a newer Python, e.g. python3.12 -m venv .venv (Windows: py -3.12 -m venv .venv)")
    return None


def ensure_pip() -> None:
    """Upgrade this environment's pip when it is older than the dry-run report needs."""
    from importlib import metadata
    try:
        version = tuple(int(part) for part in re.findall(r"\d+", metadata.version("pip"))[:2])
    except metadata.PackageNotFoundError:
        print(f"[!] this environment has no pip ({sys.executable}): add it with "
              f"{Path(sys.executable).name} -m ensurepip --upgrade, then run this script again")
        raise SystemExit(2) from None
    if version < MIN_PIP:
        print(f"[*] pip {metadata.version('pip')} is too old for a dry run with a report: upgrading it")
        pip(["install", "--upgrade", "pip"])


def install_tensorrt(lines: list) -> bool:
    """Install the TensorRT lines (with their dependencies); return False, having said why, when
    pip fails (e.g. NVIDIA's package index, where the wheels come from, cannot be reached)."""
    if not lines:
        return True
    print(f"[*] TensorRT: pip install {' '.join(lines)} (the wheel comes from NVIDIA's package index)")
    done = subprocess.run([sys.executable, "-m", "pip", "install", *lines])
    if done.returncode != 0:
        print("[!] TensorRT could not be installed (pip's error is above). Everything else is: "
              "runs use CUDA. Run this script again when NVIDIA's package index can be reached, "
              "or install TensorRT 10 on the system (docs/gpu.md)")
    return done.returncode == 0


def check_result(state: dict) -> list:
    """Return the problems of the finished install: not exactly one ONNX Runtime (the GPU one),
    onnxruntime not importable, or a GPU provider not listed."""
    problems = []
    if list(state["builds"]) != ["onnxruntime-gpu"]:
        problems.append(f"the ONNX Runtime distributions installed are {state['builds'] or 'none'}, "
                        f"not onnxruntime-gpu alone")
    if state["error"]:
        problems.append(f"onnxruntime cannot be imported: {state['error']}")
    missing = [p for p in GPU_PROVIDERS if p not in state["providers"]]
    if missing and not state["error"]:
        problems.append(f"onnxruntime does not list {', '.join(missing)} (providers: {state['providers']})")
    return problems


def swap_builds(remove: list, gpu_pin: str) -> None:
    """Replace the installed builds (remove) by the GPU build alone: its wheel is downloaded first,
    then both builds are uninstalled and the GPU one installed from that file, offline."""
    with tempfile.TemporaryDirectory(prefix="install-gpu-") as folder:
        fetch_gpu_build(gpu_pin, folder)
        print(f"[*] uninstalling {' and '.join(remove)}: the CPU build is installed, and both "
              f"builds share one onnxruntime folder")
        try:
            pip(["uninstall", "--yes", "--quiet", *remove])
        finally:  # also after a failed uninstall: whatever it removed, the GPU build is back
            pip(["install", "--quiet", "--no-deps", "--no-index", "--find-links", folder, gpu_pin])


def main(argv=None) -> int:
    """Install the GPU set into this Python's environment; return the exit code (docstring)."""
    args = parse_args(argv)
    problem = unsupported_here()
    if problem:
        print(f"[!] {problem}")
        return 2
    ensure_pip()
    resolved, tensorrt = split_gpu_set(requirement_lines(GPU_REQUIREMENTS[args.cuda]), args.system_libs)
    pins = pins_to_install(resolve(["-r", str(CPU_REQUIREMENTS), *resolved]))
    remove = builds_to_remove(installed_builds())
    if remove:
        swap_builds(remove, gpu_build_pin(pins, resolved))
        pins = [pin for pin in pins if requirement_name(pin) != "onnxruntime-gpu"]
    if pins:
        print(f"[*] installing {len(pins)} package(s) without the CPU onnxruntime: {' '.join(pins)}")
        pip(["install", "--no-deps", *pins])
    elif not remove:
        print(f"[*] {CPU_REQUIREMENTS.name} and {' '.join(resolved)}: already installed")
    tensorrt_ok = install_tensorrt(tensorrt)
    state = installed_state()
    problems = check_result(state)
    for text in problems:
        print(f"[!] {text}; run this script again, or see docs/gpu.md (Troubleshooting)")
    if not problems:
        print(f"[ok] onnxruntime-gpu {state['builds']['onnxruntime-gpu']} is the only ONNX Runtime; "
              f"providers: {', '.join(state['providers'])}")
        print("[*] next: python main.py --check (the GPUs, and which CUDA, cuDNN and TensorRT "
              "libraries load, from pip or the system)")
    return 1 if problems or not tensorrt_ok else 0


if __name__ == "__main__":
    sys.exit(main())
