#!/usr/bin/env python3
"""Makes a `python:3.11-slim`-like OCI image from this Debian host's own packages and pushes
it to a registry, for machines that cannot pull images from outside (moat's tests, and
operators on closed networks). No container engine is needed.

The image holds the files of the packages below and of everything they depend on, as dpkg
lists them (documentation, manual pages and translations left out), the merged-/usr links
(`/bin` -> `usr/bin`, ...), and the configuration a Python image has: `PATH`, `LANG`, and
`python3` as its command. Its `python3` is Debian's 3.11 with pip and venv.

    python3 scripts/python-image.py REGISTRY [REPO:TAG]

REGISTRY is `host:port` (spoken to over plain HTTP: a registry on loopback, such as Debian's
`docker-registry`); REPO:TAG defaults to `python:3.11-slim`. Prints the manifest's digest.
Run as root (some package files are readable by root only).
"""

import gzip
import io
import os
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oci  # noqa: E402

# What the image is for: Python with pip and venv, and the shells and tools commands expect.
# libstdc++ and libgcc: what compiled wheels (numpy, pandas, matplotlib) link against, as in
# the python:3.11-slim images.
PACKAGES = ["python3", "python3-pip", "python3-venv", "bash", "dash", "coreutils",
            "libc-bin", "ca-certificates", "tzdata", "grep", "sed", "findutils",
            "libstdc++6", "libgcc-s1", "zlib1g"]
# Paths left out: documentation and translations, which an image does not need.
SKIP_PREFIXES = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/info/",
                 "/usr/share/locale/", "/usr/share/lintian/")
# The merged-/usr links of Debian 12 and the directories every root has.
ROOT_LINKS = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"]
ROOT_DIRS = {"etc": 0o755, "tmp": 0o1777, "root": 0o700, "home": 0o755, "var": 0o755,
             "var/tmp": 0o1777, "usr": 0o755, "usr/local": 0o755, "usr/local/bin": 0o755,
             "proc": 0o555, "dev": 0o755, "run": 0o755}
# Accounts of the image (moat adds its `user` itself).
PASSWD = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def installed_closure(packages):
    """`packages` and what they depend on (pre-depends too), as far as they are installed."""
    seen, todo = set(), list(packages)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Depends}, ${Pre-Depends}\n", name],
            capture_output=True, text=True)
        if out.returncode != 0 or "install ok installed" not in out.stdout:
            continue
        seen.add(name)
        deps = out.stdout.split("\t", 1)[1]
        for alternative in deps.split(","):
            # The first installed alternative of `a | b`, without versions or arch.
            for option in alternative.split("|"):
                dep = option.strip().split(" ")[0].split(":")[0]
                if dep:
                    todo.append(dep)
                    break
    return sorted(seen)


def package_files(package):
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    return [p for p in out.stdout.splitlines() if p.startswith("/")]


def build_layer():
    """The image's one layer: a tar and its gzipped bytes."""
    # In-image path -> host path. Files dpkg lists under /bin, /lib, ... are where those
    # merged-/usr links lead (usr/bin, usr/lib, ...).
    entries = {}
    for package in installed_closure(PACKAGES):
        for path in package_files(package):
            if path.startswith(SKIP_PREFIXES) or not os.path.lexists(path):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                arc = os.path.realpath(path)
            else:
                arc = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
            entries.setdefault(arc, path)
            parent = os.path.dirname(arc)
            while parent not in ("/", ""):
                entries.setdefault(parent, parent)
                parent = os.path.dirname(parent)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add_text(name, text, mode):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))

        for name, mode in sorted(ROOT_DIRS.items()):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
            tar.addfile(info)
        for name in ROOT_LINKS:
            if os.path.islink("/" + name):
                info = tarfile.TarInfo(name)
                info.type, info.linkname, info.mtime = tarfile.SYMTYPE, os.readlink("/" + name), 0
                tar.addfile(info)
        for arc, path in sorted(entries.items()):
            name = arc.lstrip("/")
            if name in ROOT_DIRS or name in ROOT_LINKS or arc in ("/etc/passwd", "/etc/group"):
                continue
            info = tar.gettarinfo(path, arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif info.isdir() or info.issym() or info.islnk():
                tar.addfile(info)
        add_text("etc/passwd", PASSWD, 0o644)
        add_text("etc/group", GROUP, 0o644)
        # Debian's python refuses pip installs into the system without this flag; an image's
        # python is the image's to change, as in python:3.11-slim.
        add_text("etc/pip.conf", "[global]\nbreak-system-packages = true\n", 0o644)
    tar_bytes = raw.getvalue()
    return tar_bytes, gzip.compress(tar_bytes, compresslevel=1)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    registry = sys.argv[1]
    repo, _, tag = (sys.argv[2] if len(sys.argv) == 3 else "python:3.11-slim").partition(":")
    layer = build_layer()
    run_config = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8"],
        "Cmd": ["python3"],
    }
    print(oci.push(f"http://{registry}", repo, tag or "latest", [layer], run_config))


if __name__ == "__main__":
    main()
