"""Test helpers for the Hugging Face Hub, which these tests never reach:

- `HubRepo`: a model repo in memory (commits with their files, branches and tags, newest commit first).
- `write_cache`: that repo written as the Hugging Face cache holds it (`models--org--name/blobs`, `refs/`,
  `snapshots/<commit>/` symlinks to blobs), built by hand, for offline use.
- `HubStandin`: a local HTTP server on 127.0.0.1 that answers the routes the real `huggingface_hub` client calls
  (model info by revision, refs, commits, paths-info, file resolution with HEAD and range requests, repo and branch
  creation, preupload and commit), pointed at with HF_ENDPOINT. It logs every request and the bytes it served
  per file, so a test can say what was downloaded.
- `CkptavgRunner`: `ckptavg` run in a process of its own per call, with its own environment (huggingface_hub reads
  HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported), forked from a server that imported torch and
  ckptavg once, so that a call costs a fork instead of a torch import.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Commit:
    sha: str
    title: str
    files: dict[str, bytes]
    parent: str | None
    date: str = "2026-01-01T00:00:00.000Z"


@dataclass
class HubRepo:
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private: bool = False

    def commit(self, files: dict[str, bytes], title: str, branch: str = "main", keep: bool = True) -> str:
        """A new commit on `branch` (created from main when new) adding `files` to its tree (`keep`) or replacing it."""
        parent = self.branches.get(branch, self.branches.get("main"))
        tree = dict(self.commits[parent].files) if parent and keep else {}
        tree.update(files)
        digest = hashlib.sha1(
            json.dumps([parent, title, len(self.commits), sorted((k, _sha256(v)) for k, v in tree.items())]).encode()
        )
        sha = digest.hexdigest()
        self.commits[sha] = Commit(sha, title, tree, parent, f"2026-01-{len(self.commits) + 1:02d}T00:00:00.000Z")
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        return revision if revision in self.commits else None

    def history(self, sha: str) -> list[Commit]:
        out = []
        while sha is not None:
            out.append(self.commits[sha])
            sha = self.commits[sha].parent
        return out

    def size(self, sha: str) -> int:
        return sum(len(v) for v in self.commits[sha].files.values())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_cache(cache: Path, repo_id: str, repo: HubRepo, commits: list[str] | None = None, skip: tuple[str, ...] = ()) -> Path:
    """`repo` as the HF cache holds it: blobs by sha256, refs/<branch or tag> = commit, snapshots/<commit>/<path>
    symlinks to the blobs (`commits`: only those; `skip`: file names left out, as a partial download leaves it)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    chosen = commits if commits is not None else list(repo.commits)
    for sha in chosen:
        for path, data in repo.commits[sha].files.items():
            if path.rsplit("/", 1)[-1] in skip:
                continue
            blob = root / "blobs" / _sha256(data)
            blob.write_bytes(data)
            link = root / "snapshots" / sha / path
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(os.path.relpath(blob, link.parent))
    for name, sha in {**repo.branches, **repo.tags}.items():
        if sha in chosen:
            ref = root / "refs" / name
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(sha)
    return root


class HubStandin:
    """The Hub's HTTP API for a few repos, on 127.0.0.1 (a free port), in a thread."""

    def __init__(self, repos: dict[str, HubRepo], token: str | None = None) -> None:
        self.repos = repos
        self.token = token  # when set, gated repos answer only a request that carries it
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.unknown: list[tuple[str, str]] = []  # requests no route answered
        self.served: dict[str, int] = {}  # "repo:path" → body bytes sent by resolve GETs
        self.auth_seen: list[str | None] = []
        self.fail_commits = False
        self.validated: list[dict] = []  # the model card metadata validate-yaml was asked about
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                standin._handle(self, "GET")

            def do_HEAD(self) -> None:
                standin._handle(self, "HEAD")

            def do_POST(self) -> None:
                standin._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def served_files(self, repo_id: str) -> set[str]:
        return {key.split(":", 1)[1] for key in self.served if key.startswith(repo_id + ":")}

    # --- routing --------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path, query = parts.path, parse_qs(parts.query)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self.lock:
            self.log.append((method, path))
            self.auth_seen.append(h.headers.get("Authorization"))
        routes = [
            ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", self._info),
            ("GET", rf"/api/models/{REPO}/refs", self._refs),
            ("GET", rf"/api/models/{REPO}/commits/(?P<rev>[^/]+)", self._commits),
            ("POST", rf"/api/models/{REPO}/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", r"/api/agent-harnesses", self._harnesses),
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", self._create_branch),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self._commit),
        ]
        for verb, pattern, action in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                if "repo" in args:
                    repo = self.repos.get(args["repo"])
                    if repo is None:
                        return self._error(h, method, 404, "RepoNotFound", "Repository not found")
                    if repo.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
                        return self._error(h, method, 401, "GatedRepo", "Access to this model is restricted")
                return action(h, method, query=query, body=body, **args)
        with self.lock:
            self.unknown.append((method, path))
        self._error(h, method, 404, None, "no such route in the stand-in")

    def _send(
        self, h: BaseHTTPRequestHandler, method: str, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, method: str, data: object, status: int = 200) -> None:
        self._send(h, method, status, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(
        self, h: BaseHTTPRequestHandler, method: str, status: int, code: str | None, message: str, commit: str | None = None
    ) -> None:
        headers = {"X-Error-Message": message, "Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(h, method, status, json.dumps({"error": message}).encode(), headers)

    def _revision(self, h: BaseHTTPRequestHandler, method: str, repo: str, rev: str) -> str | None:
        sha = self.repos[repo].resolve(rev)
        if sha is None:
            self._error(h, method, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    # --- reading ------------------------------------------------------------------------------------

    def _info(self, h, method, repo, rev="main", query=None, body=b""):
        sha = self._revision(h, method, repo, rev)
        if sha is None:
            return
        files = self.repos[repo].commits[sha].files
        siblings = [{"rfilename": p, "size": len(d), "blobId": hashlib.sha1(d).hexdigest()} for p, d in sorted(files.items())]
        self._json(h, method, {"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings, "tags": []})

    def _refs(self, h, method, repo, query=None, body=b""):
        r = self.repos[repo]

        def ref(kind: str, name: str, sha: str) -> dict:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

        self._json(
            h,
            method,
            {
                "branches": [ref("heads", n, s) for n, s in r.branches.items()],
                "tags": [ref("tags", n, s) for n, s in r.tags.items()],
                "converts": [],
            },
        )

    def _commits(self, h, method, repo, rev, query=None, body=b""):
        sha = self._revision(h, method, repo, rev)
        if sha is None:
            return
        history = self.repos[repo].history(sha)
        self._json(
            h,
            method,
            [{"id": c.sha, "title": c.title, "message": "", "authors": [{"user": "trainer"}], "date": c.date} for c in history],
        )

    def _paths_info(self, h, method, repo, rev, query=None, body=b""):
        sha = self._revision(h, method, repo, rev)
        if sha is None:
            return
        form = parse_qs(body.decode())
        r = self.repos[repo]
        out = []
        for path in form.get("paths", []):
            if path not in r.commits[sha].files:
                continue
            data = r.commits[sha].files[path]
            last = next(c for c in r.history(sha) if c.parent is None or r.commits[c.parent].files.get(path) != c.files.get(path))
            out.append(
                {
                    "type": "file",
                    "path": path,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                    "lastCommit": {"id": last.sha, "title": last.title, "date": last.date},
                }
            )
        self._json(h, method, out)

    def _harnesses(self, h, method, query=None, body=b""):
        """The registry huggingface_hub fetches for its user agent (unless HF_HUB_DISABLE_TELEMETRY=1): empty here."""
        self._json(h, method, {"standardEnvVars": [], "harnesses": {}})

    def _resolve(self, h, method, repo, rev, file, query=None, body=b""):
        sha = self._revision(h, method, repo, rev)
        if sha is None:
            return
        data = self.repos[repo].commits[sha].files.get(file)
        if data is None:
            return self._error(h, method, 404, "EntryNotFound", f"{file} does not exist", commit=sha)
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{_sha256(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status, part = 200, data
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if ranged:
            start = int(ranged.group(1))
            end = min(int(ranged.group(2)) if ranged.group(2) else len(data) - 1, len(data) - 1)
            status, part = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if method == "GET":
            with self.lock:
                key = f"{repo}:{file}"
                self.served[key] = self.served.get(key, 0) + len(part)
        self._send(h, method, status, part, headers)

    # --- writing ------------------------------------------------------------------------------------

    def _create_repo(self, h, method, query=None, body=b""):
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if repo_id in self.repos:  # the Hub's 409 names the repo's URL, which huggingface_hub reads
            body = json.dumps({"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}).encode()
            return self._send(
                h,
                method,
                409,
                body,
                {"X-Error-Message": "You already created this model repo", "Content-Type": "application/json"},
            )
        self.repos[repo_id] = HubRepo()
        self.repos[repo_id].private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._json(h, method, {"url": f"{self.url}/{repo_id}"})

    def _validate_yaml(self, h, method, query=None, body=b""):
        """A README.md's YAML as the Hub checks a model card's: a mapping; tags a list of strings; base_model one
        repo id or a list of them; base_model_relation one of the four the Hub knows; library_name a string."""
        import yaml

        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            data, errors = {}, [f"YAML: {e}"]
        if not isinstance(data, dict):
            errors.append("metadata must be a mapping")
            data = {}
        base = data.get("base_model")
        if base is not None and not all(
            isinstance(b, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", b) for b in (base if isinstance(base, list) else [base])
        ):
            errors.append(f"base_model: not a repo id or list of repo ids: {base!r}")
        if "base_model_relation" in data and (
            data["base_model_relation"] not in ("adapter", "merge", "quantized", "finetune") or base is None
        ):
            errors.append(
                f"base_model_relation: {data['base_model_relation']!r} needs base_model and one of adapter, merge, quantized, "
                "finetune"
            )
        if not all(isinstance(t, str) for t in data.get("tags") or []):
            errors.append("tags: a list of strings")
        if "library_name" in data and not isinstance(data["library_name"], str):
            errors.append("library_name: a string")
        self.validated.append(data)
        self._json(h, method, {"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)

    def _create_branch(self, h, method, repo, branch, query=None, body=b""):
        r = self.repos[repo]
        if branch in r.branches:
            return self._error(h, method, 409, None, "Branch already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        if start in r.branches:
            r.branches[branch] = r.branches[start]
        else:
            r.commit({}, "initial commit", branch)
        self._json(h, method, {})

    def _preupload(self, h, method, repo, rev, query=None, body=b""):
        files = json.loads(body)["files"]
        self._json(
            h,
            method,
            {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]},
        )

    def _commit(self, h, method, repo, rev, query=None, body=b""):
        if self.fail_commits:  # what the Hub answers an account over its storage quota; not a status huggingface_hub retries
            return self._error(h, method, 403, None, "You have exceeded your storage quota")
        r = self.repos[repo]
        header, files = {}, {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        sha = r.commit(files, header.get("summary", ""), rev)
        self._json(h, method, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})


# --- ckptavg in a process of its own per call -------------------------------------------------------------

SERVER = r"""
import json, os, sys, traceback
import torch, ckptavg.cli, ckptavg.averaging, ckptavg.exporting, ckptavg.selection, ckptavg.inspection
# Each call must import huggingface_hub itself, after its environment is set: that is when it reads it.
assert "huggingface_hub" not in sys.modules, "ckptavg imported huggingface_hub at import time"
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = ["ckptavg", *request["argv"]]
            code = 0
            try:
                ckptavg.cli.main(request["argv"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


@dataclass
class Result:
    code: int
    out: str
    err: str


class CkptavgRunner:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls = 0
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def __call__(self, *argv: object, env: dict[str, str], cwd: Path | None = None) -> Result:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.calls += 1
        out, err = self.folder / f"out{self.calls}", self.folder / f"err{self.calls}"
        request = {"argv": [str(a) for a in argv], "env": env, "cwd": str(cwd or self.folder), "out": str(out), "err": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        code = int(self.process.stdout.readline())
        return Result(code, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def hub_url(repo_id: str, revision: str | None = None, subfolder: str = "") -> str:
    return f"hf://{repo_id}{'@' + quote(revision, safe='') if revision else ''}{'/' + subfolder if subfolder else ''}"
