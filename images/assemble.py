#!/usr/bin/env python3
"""Assembles a container image (docker-archive tarball, as `docker save` writes it) from the
final stage of one of images/*.Dockerfile, without a container engine or a registry.

No engine runs on the machines this project is tested on and base images cannot be pulled, so the
Dockerfile's final stage is followed instruction by instruction instead of built:
- COPY --from=build SRC DEST: SRC is taken from a local file or directory given by --source
  SRC=LOCAL (a COPY without one is an error naming the Dockerfile line);
- RUN apt-get install PKG...: the files of those Debian packages as installed on this (Debian
  bookworm) machine, plus /etc/ssl/certs/ca-certificates.crt for ca-certificates;
- RUN useradd / USER: an /etc/passwd and /etc/group with that user;
- ENV, USER, ENTRYPOINT, EXPOSE, WORKDIR: the image config;
- the base image's C runtime: the shared-library closure (ldd) of every ELF file copied.
Anything else in the final stage is refused, so the script and the Dockerfile cannot drift apart
silently. `--check` prints the layout instead of writing it (tests compare it with the Dockerfile).

Usage: assemble.py DOCKERFILE TAG OUT.tar --source SRC=LOCAL [...]
"""
import argparse
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile


class DockerfileError(Exception):
    pass


# What a base image provides beyond the C runtime (which comes from the binaries' ldd closure):
# files taken from this machine. distroless/cc ships CA certificates; debian-slim does not (the
# trainer's Dockerfile installs ca-certificates itself).
BASE_FILES = {
    "gcr.io/distroless/cc-debian12": ["/etc/ssl/certs/ca-certificates.crt"],
    "debian": [],
    "nvidia/cuda": [],
}


def instructions(path):
    """(line number, instruction, argument) of every instruction, continuation lines joined."""
    lines, buf, start = [], "", 0
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not buf and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if not buf:
                start = n
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            instr, _, arg = buf.strip().partition(" ")
            lines.append((start, instr.upper(), arg.strip()))
            buf = ""
    return lines


def final_stage(path):
    """The ARG defaults declared before the first FROM, and the final stage's instructions."""
    lines = instructions(path)
    froms = [i for i, (_, instr, _) in enumerate(lines) if instr == "FROM"]
    if not froms:
        raise DockerfileError(f"{path}: no FROM")
    global_args = dict(arg.partition("=")[::2] for _, instr, arg in lines[: froms[0]] if instr == "ARG")
    return global_args, lines[froms[-1]:]


def parse_env(arg):
    words = shlex.split(arg)
    if len(words) == 2 and "=" not in words[0]:
        return [tuple(words)]
    return [tuple(w.split("=", 1)) for w in words]


def plan(dockerfile, sources):
    """The image's config and the files it holds: {path in image: local path or bytes}."""
    config = {"Env": [], "User": "", "Entrypoint": None, "Cmd": None, "WorkingDir": "/", "ExposedPorts": {}}
    files, packages, users = {}, [], []
    args, stage = final_stage(dockerfile)
    for n, instr, arg in stage:
        where = f"{dockerfile}:{n}"
        if instr == "FROM":
            base = arg.split()[0]
            base = args.get(base.strip("${}"), base) if base.startswith("$") else base
            known = [k for k in BASE_FILES if base.split(":")[0] == k or base.split(":")[0].startswith(k + "/")]
            if not known:
                raise DockerfileError(f"{where}: unknown base image {base}: say in BASE_FILES what it provides")
            for f in BASE_FILES[known[0]]:
                files[f] = f
        elif instr == "COPY":
            words = shlex.split(arg)
            if not words or not words[0].startswith("--from="):
                raise DockerfileError(f"{where}: only COPY --from=<stage> is supported: {arg}")
            src, dest = words[1], words[2]
            if src not in sources:
                raise DockerfileError(f"{where}: no --source for COPY {src} (give --source {src}=<local path>)")
            local = sources[src]
            if os.path.isdir(local):
                for root, _, names in os.walk(local):
                    for name in names:
                        p = os.path.join(root, name)
                        files[os.path.join(dest, os.path.relpath(p, local))] = p
            elif dest.endswith("/"):
                files[dest + os.path.basename(src)] = local
            else:
                files[dest] = local
        elif instr == "ENV":
            for k, v in parse_env(arg):
                config["Env"] = [e for e in config["Env"] if not e.startswith(k + "=")] + [f"{k}={v}"]
        elif instr == "USER":
            config["User"] = arg
        elif instr == "ENTRYPOINT":
            config["Entrypoint"] = json.loads(arg)
        elif instr == "CMD":
            config["Cmd"] = json.loads(arg)
        elif instr == "WORKDIR":
            config["WorkingDir"] = arg
        elif instr == "EXPOSE":
            config["ExposedPorts"][f"{arg}/tcp"] = {}
        elif instr == "RUN":
            for command in arg.split("&&"):
                words = shlex.split(command.strip().strip("()"))
                if words[:2] == ["apt-get", "install"]:
                    packages += [w for w in words[2:] if not w.startswith("-")]
                elif "useradd" in words:
                    users.append(int(words[words.index("--uid") + 1]))
                elif words[:2] in (["apt-get", "update"], ["rm", "-rf"]) or words[:1] == ["getent"]:
                    continue
                else:
                    raise DockerfileError(f"{where}: cannot follow RUN {command.strip()!r} without an engine")
        elif instr == "ARG":
            name, _, default = arg.partition("=")
            args[name] = default or args.get(name, "")
        elif instr == "LABEL":
            continue
        else:
            raise DockerfileError(f"{where}: unsupported instruction {instr}")
    if not any(e.startswith("PATH=") for e in config["Env"]):
        config["Env"].insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for pkg in packages:
        listed = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
        if listed.returncode != 0:
            raise DockerfileError(f"package {pkg} (installed by the Dockerfile) is not installed on this machine: apt-get install {pkg}")
        for p in listed.stdout.split():
            if os.path.isfile(p) and not p.startswith("/usr/share/doc"):
                files[p] = p
        if pkg == "ca-certificates":
            files["/etc/ssl/certs/ca-certificates.crt"] = "/etc/ssl/certs/ca-certificates.crt"
    uid = int(config["User"].split(":")[0]) if config["User"] else 0
    users = sorted(set(users + ([uid] if uid else [])))
    passwd = "root:x:0:0:root:/root:/usr/sbin/nologin\n" + "".join(f"medmerge:x:{u}:{u}::/tmp:/usr/sbin/nologin\n" for u in users)
    files["/etc/passwd"] = passwd.encode()
    files["/etc/group"] = ("root:x:0:\n" + "".join(f"medmerge:x:{u}:\n" for u in users)).encode()
    ld_path = [e.split("=", 1)[1] for e in config["Env"] if e.startswith("LD_LIBRARY_PATH=")]
    files.update(shared_libraries(files, ld_path[0].split(":") if ld_path else []))
    return config, files


def is_elf(path):
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def shared_libraries(files, ld_path):
    """The C runtime the copied ELF files need and the image does not hold itself."""
    in_image = {os.path.basename(p) for p in files}
    local_dirs = {os.path.dirname(v) for k, v in files.items() if isinstance(v, str) and any(k.startswith(d + "/") for d in ld_path)}
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(sorted(local_dirs) + [os.environ.get("LD_LIBRARY_PATH", "")]))
    libs = {}
    for image_path, local in list(files.items()):
        if not isinstance(local, str) or not is_elf(local) or not os.access(local, os.X_OK) and ".so" not in local:
            continue
        out = subprocess.run(["ldd", os.path.realpath(local)], capture_output=True, text=True, env=env).stdout
        for line in out.splitlines():
            parts = line.split()
            if "not found" in line and parts[0] not in in_image:
                raise DockerfileError(f"{image_path} needs {parts[0]}, which is neither in the image nor on this machine")
            path = parts[2] if "=>" in parts and len(parts) > 2 and parts[2].startswith("/") else (parts[0] if parts and parts[0].startswith("/") else None)
            if path and os.path.basename(path) not in in_image:
                real = os.path.realpath(path)
                if path.startswith(("/lib/", "/lib64/", "/usr/lib/")):
                    libs[path] = real
                    # Debian's loader paths: /lib is /usr/lib on a merged-/usr system.
                    if path.startswith("/lib/"):
                        libs["/usr" + path] = real
                elif ld_path:
                    # Found through a RUNPATH that means nothing in the image (a wheel's
                    # $ORIGIN/../nvidia/...): the image's library path holds it instead.
                    libs[os.path.join(ld_path[0], os.path.basename(path))] = real
                else:
                    raise DockerfileError(f"{image_path} needs {path}, outside the system library directories, and the image sets no LD_LIBRARY_PATH")
                in_image.add(os.path.basename(path))
    return libs


def add(tf, name, data=None, local=None, mode=0o755):
    info = tarfile.TarInfo(name.lstrip("/"))
    info.mtime = 0
    if local is not None:
        info.size = os.path.getsize(local)
        info.mode = os.stat(local).st_mode & 0o777 | 0o444
        with open(local, "rb") as f:
            tf.addfile(info, f)
    else:
        info.size = len(data)
        info.mode = mode
        tf.addfile(info, io.BytesIO(data))


def write(config, files, tag, out):
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as work:
        layer_path = os.path.join(work, "layer.tar")
        with tarfile.open(layer_path, "w", format=tarfile.GNU_FORMAT) as lt:
            dirs = {"tmp"}
            for path in files:
                parts = path.strip("/").split("/")[:-1]
                dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
            for d in sorted(dirs):
                info = tarfile.TarInfo(d)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755, 0
                lt.addfile(info)
            for path in sorted(files):
                v = files[path]
                add(lt, path, data=v) if isinstance(v, bytes) else add(lt, path, local=v)
        digest = hashlib.sha256()
        with open(layer_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        diff_id = digest.hexdigest()
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z", "config": config,
                          "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
                          "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "images/assemble.py"}]}).encode()
        cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
        tmp_out = out + ".tmp"
        with tarfile.open(tmp_out, "w") as ot:
            add(ot, cfg_name, data=cfg, mode=0o644)
            add(ot, diff_id + "/layer.tar", local=layer_path)
            manifest = [{"Config": cfg_name, "RepoTags": [tag], "Layers": [diff_id + "/layer.tar"]}]
            add(ot, "manifest.json", data=json.dumps(manifest).encode(), mode=0o644)
        os.replace(tmp_out, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dockerfile")
    ap.add_argument("tag")
    ap.add_argument("out")
    ap.add_argument("--source", action="append", default=[], help="SRC=LOCAL for a COPY --from=build SRC")
    ap.add_argument("--check", action="store_true", help="print config and layout as JSON, write nothing")
    a = ap.parse_args()
    sources = dict(s.split("=", 1) for s in a.source)
    try:
        config, files = plan(a.dockerfile, sources)
    except DockerfileError as e:
        sys.exit(f"assemble: {e}")
    if a.check:
        json.dump({"config": config, "files": sorted(files)}, sys.stdout, indent=1)
        return
    write(config, files, a.tag, a.out)
    print(f"assemble: {a.tag} -> {a.out} ({os.path.getsize(a.out) >> 20} MiB, {len(files)} files)", file=sys.stderr)


if __name__ == "__main__":
    main()
