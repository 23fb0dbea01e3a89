"""macnat installed as a wheel (`pip install .` into a fresh venv) works from any directory: the
datapath sources ship inside the package, and Debian's bcc is found without system site-packages."""

import subprocess
from pathlib import Path

from macnat import lab

REPO = Path(__file__).resolve().parents[1]


def test_wheel_install_attaches_from_anywhere(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(REPO)],
                   check=True, cwd=tmp_path, timeout=600)
    where = subprocess.run([str(venv / "bin/python"), "-c",
                            "import macnat, macnat.loader as l; print(macnat.__file__); print(l.bpf_source_dir())"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    package_dir, bpf_dir = Path(where[0]).parent, Path(where[1])
    assert package_dir.is_relative_to(venv) and bpf_dir == package_dir / "bpf"
    assert (bpf_dir / "macnat.c").read_bytes() == (REPO / "bpf/macnat.c").read_bytes()
    assert (bpf_dir / "macnat.h").is_file()

    lab.up()
    try:
        manager = lab.RunningManager(log=tmp_path / "manager.log", executable=str(venv / "bin/macnat"))
        try:
            assert lab.dhcp("vm1")
            assert lab.ping(lab.VMS["vm1"].ns, lab.LANHOST.ip)
        finally:
            assert manager.stop() == 0, manager.text()
    finally:
        lab.down()
