"""Pushing OCI images to a registry over its HTTP API, for the project's scripts and
benchmarks (no container engine needed): blobs by monolithic upload, then the manifest."""

import hashlib
import json
import urllib.request


def http(method, url, body=None, headers=None):
    """One request; its status, headers and body. Raises on an error status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.status, dict(r.headers), r.read()


def digest(data):
    """The `sha256:` digest of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push(registry, repo, tag, layers, run_config):
    """Pushes an image of `layers` ([(tar, gzipped tar)], base first) whose container
    configuration is `run_config` (`Env`, `Cmd`, `WorkingDir`, ...) to `registry`
    (`http://host:port`) as `repo:tag`. Returns the manifest's digest."""

    def blob(data):
        _, h, _ = http("POST", f"{registry}/v2/{repo}/blobs/uploads/", b"")
        loc = h["Location"]
        loc = loc if loc.startswith("http") else registry + loc
        sep = "&" if "?" in loc else "?"
        http("PUT", f"{loc}{sep}digest={digest(data)}", data,
             {"Content-Type": "application/octet-stream"})

    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": [digest(t) for t, _ in layers]},
    }).encode()
    blob(config)
    for _, gz in layers:
        blob(gz)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(gz), "size": len(gz)} for _, gz in layers],
    }).encode()
    http("PUT", f"{registry}/v2/{repo}/manifests/{tag}", manifest,
         {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    return digest(manifest)
