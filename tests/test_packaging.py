"""macnat installed the two ways other distributions get it, both working from any directory with
Debian's bcc: as a wheel (`pip install .` into a fresh venv, which finds bcc without system
site-packages) and with pipx as README documents (`pipx install --system-site-packages --python
/usr/bin/python3`, for all users); each then attaches in the lab. The Debian package: test_debian.py."""

import os
import subprocess
from pathlib import Path

import macnat
from macnat import lab

REPO = Path(__file__).resolve().parents[1]


def attaches_in_the_lab(executable: Path, log: Path) -> None:
    lab.up()
    try:
        manager = lab.RunningManager(log=log, executable=str(executable))
        try:
            assert lab.dhcp("vm1")
            assert lab.ping(lab.VMS["vm1"].ns, lab.LANHOST.ip)
        finally:
            assert manager.stop() == 0, manager.text()
    finally:
        lab.down()


def installed_where(python: Path, cwd: Path) -> dict[str, str]:
    code = ("import importlib.metadata, macnat, macnat.loader as l; print(macnat.__file__, l.bpf_source_dir(), "
            "importlib.metadata.version('macnat'), l.import_bcc().__file__)")
    where = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, cwd=cwd).stdout.split()
    return dict(zip(("package", "bpf", "version", "bcc"), where))


def test_wheel_install_attaches_from_anywhere(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(REPO)],
                   check=True, cwd=tmp_path, timeout=600)
    where = installed_where(venv / "bin/python", tmp_path)
    package_dir, bpf_dir = Path(where["package"]).parent, Path(where["bpf"])
    assert package_dir.is_relative_to(venv) and bpf_dir == package_dir / "bpf"
    assert (bpf_dir / "macnat.c").read_bytes() == (REPO / "bpf/macnat.c").read_bytes()
    assert (bpf_dir / "macnat.h").is_file()
    assert where["version"] == macnat.__version__  # pyproject.toml takes it from macnat/__init__.py
    attaches_in_the_lab(venv / "bin/macnat", tmp_path / "manager.log")


def test_pipx_install_attaches(tmp_path):
    """README's pipx route, with the two directories in the test's own place instead of /opt/pipx
    and /usr/local/bin. Debian 12's pipx (1.1.0) has no --global: the variables make it system-wide."""
    env = {**os.environ, "PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin")}
    subprocess.run(["pipx", "install", "--system-site-packages", "--python", "/usr/bin/python3", str(REPO)],
                   env=env, check=True, capture_output=True, cwd=tmp_path, timeout=600)
    executable = tmp_path / "bin/macnat"
    python = tmp_path / "pipx/venvs/macnat/bin/python"
    where = installed_where(python, tmp_path)
    assert Path(where["package"]).is_relative_to(tmp_path / "pipx/venvs/macnat")
    assert where["bcc"] == "/usr/lib/python3/dist-packages/bcc/__init__.py"  # Debian's, via system site-packages
    assert subprocess.run([str(executable), "--version"], capture_output=True, text=True,
                          check=True).stdout == f"macnat {macnat.__version__}\n"
    attaches_in_the_lab(executable, tmp_path / "manager.log")
