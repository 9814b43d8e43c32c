#!/usr/bin/env python3
"""A loopback fake OpenShell gateway for nemoclaw's tests of the real `openshell` CLI.

Speaks the gRPC service `openshell.v1.OpenShell` in plaintext HTTP/2 on 127.0.0.1, with the
message types of the PyPI package `openshell==0.0.116` (a wire-compatible superset of v0.0.111's
for every RPC below). Only what the CLI's `status`, `sandbox get/list/create/delete/upload/
download/exec` and `policy get/set` need is implemented; the texts of errors follow the v0.0.111
gateway (`sandbox not found`, `sandbox '<name>' already exists`, ...).

State directory (`--state DIR`):
  port            the port, written once listening
  index.json      the sandboxes (name, id, phase, labels, policy, gpu, providers), rewritten on
                  every change, for tests to read
  calls.log       one JSON line per RPC: {"method", "name"}
  exec.log        one JSON line per ExecSandbox: {"command", "stdin" (its length), "timeout"}
  faults.json     re-read on every RPC (all keys optional):
                    {"unavailable": true,       every RPC: UNAVAILABLE "compute driver unavailable"
                     "unauthenticated": true,   every RPC but Health: UNAUTHENTICATED
                     "hang": ["GetSandbox"],    these RPCs never answer
                     "create_error": true,      a created sandbox goes to phase Error
                     "delete_polls": N,         a deleted sandbox stays Deleting for N GetSandbox
                     "fail": {"CreateSandbox": "INTERNAL:message"},   one RPC fails
                     "healthz": 503,            status of `GET /healthz` (default 200)
                     "no_policy": true,         GetSandboxConfig answers without a policy
                     "exec_cut": N,             ExecSandbox: see `ExecSandbox`
                     "exec_flip": N}
  providers.json  optional list of provider names `GetProvider` knows
  sandboxes/<id>/ plays `/sandbox` of that sandbox (`.openclaw/` created with it); the fake
                  `ssh` beside this file runs upload/download commands there.

One port serves both protocols, as the real gateway does: a front listener reads the first
bytes of each connection and hands HTTP/2 (the gRPC preface) to the gRPC server on a private
port, and answers HTTP/1.1 `GET /healthz` itself (the CLI's `status` asks it after a failed
gRPC `Health`).

The process exits on SIGTERM or when its parent dies (it polls the parent pid).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent import futures

import grpc
from openshell._proto import datamodel_pb2, openshell_pb2, openshell_pb2_grpc, sandbox_pb2

PHASE = openshell_pb2.SandboxStatus.DESCRIPTOR.fields_by_name["phase"].enum_type.values_by_name
READY = PHASE["SANDBOX_PHASE_READY"].number
PROVISIONING = PHASE["SANDBOX_PHASE_PROVISIONING"].number
ERROR = PHASE["SANDBOX_PHASE_ERROR"].number
DELETING = PHASE["SANDBOX_PHASE_DELETING"].number
HEALTHY = 1  # SERVICE_STATUS_HEALTHY
LOADED = 2  # POLICY_STATUS_LOADED
SOURCE_SANDBOX = 1  # POLICY_SOURCE_SANDBOX


def default_policy():
    p = sandbox_pb2.SandboxPolicy(version=1)
    p.filesystem.include_workdir = True
    p.filesystem.read_only.extend(["/usr", "/lib", "/proc", "/dev/urandom", "/app", "/etc", "/var/log"])
    p.filesystem.read_write.extend(["/sandbox", "/tmp", "/dev/null"])
    p.landlock.compatibility = "best_effort"
    p.process.run_as_user = "sandbox"
    p.process.run_as_group = "sandbox"
    return p


class Gateway(openshell_pb2_grpc.OpenShellServicer):
    def __init__(self, state, port):
        self.state = state
        self.port = port
        self.lock = threading.RLock()
        self.boxes = {}  # name -> dict
        os.makedirs(os.path.join(state, "sandboxes"), exist_ok=True)

    # -- bookkeeping -----------------------------------------------------------------------

    def faults(self):
        try:
            with open(os.path.join(self.state, "faults.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def enter(self, method, context, name=""):
        with open(os.path.join(self.state, "calls.log"), "a") as f:
            f.write(json.dumps({"method": method, "name": name}) + "\n")
        fl = self.faults()
        if method in fl.get("hang", []):
            while context.is_active():
                time.sleep(0.05)
            context.abort(grpc.StatusCode.CANCELLED, "hung")
        if fl.get("unavailable"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "compute driver unavailable")
        if fl.get("unauthenticated") and method != "Health":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token: ExpiredSignature")
        fail = fl.get("fail", {}).get(method)
        if fail:
            code, _, msg = fail.partition(":")
            context.abort(getattr(grpc.StatusCode, code), msg)
        return fl

    def save(self):
        index = {}
        for name, b in self.boxes.items():
            index[name] = {
                "id": b["id"],
                "name": name,
                "phase": openshell_pb2.SandboxStatus.DESCRIPTOR.fields_by_name["phase"]
                .enum_type.values_by_number[b["phase"]]
                .name,
                "labels": b["labels"],
                "gpu": b["gpu"],
                "gpu_count": b["gpu_count"],
                "providers": b["providers"],
                "image": b["image"],
                "policy_version": b["policy_version"],
                "root": self.root(b),
            }
        tmp = os.path.join(self.state, "index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(self.state, "index.json"))

    def root(self, b):
        return os.path.join(self.state, "sandboxes", b["id"])

    def sandbox_msg(self, b):
        s = openshell_pb2.Sandbox()
        s.metadata.id = b["id"]
        s.metadata.name = b["name"]
        s.metadata.created_at_ms = b["created_ms"]
        s.metadata.resource_version = b["resource_version"]
        s.metadata.workspace = "default"
        for k, v in b["labels"].items():
            s.metadata.labels[k] = v
        s.spec.template.image = b["image"]
        s.spec.policy.CopyFrom(b["policy"])
        s.status.sandbox_name = b["name"]
        s.status.phase = b["phase"]
        s.status.current_policy_version = b["policy_version"]
        if b["phase"] == ERROR:
            c = s.status.conditions.add()
            c.type, c.status, c.reason = "Ready", "False", "FakeError"
            c.message = "fake create_error fault"
        return s

    def by_name(self, name, context):
        b = self.boxes.get(name)
        if b is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "sandbox not found")
        return b

    def by_id(self, sid, context):
        for b in self.boxes.values():
            if b["id"] == sid:
                return b
        context.abort(grpc.StatusCode.NOT_FOUND, "sandbox not found")

    @staticmethod
    def policy_hash(p):
        return hashlib.sha256(p.SerializeToString(deterministic=True)).hexdigest()

    # -- RPCs --------------------------------------------------------------------------------

    def Health(self, request, context):
        self.enter("Health", context)
        return openshell_pb2.HealthResponse(status=HEALTHY, version="0.0.111")

    def GetGatewayInfo(self, request, context):
        self.enter("GetGatewayInfo", context)
        return openshell_pb2.GetGatewayInfoResponse(status=HEALTHY, gateway_version="0.0.111")

    def GetSandbox(self, request, context):
        self.enter("GetSandbox", context, request.name)
        with self.lock:
            b = self.by_name(request.name, context)
            if b["phase"] == DELETING:
                if b["deleting_left"] <= 0:
                    self.remove(request.name)
                    context.abort(grpc.StatusCode.NOT_FOUND, "sandbox not found")
                b["deleting_left"] -= 1
            self.provisioned(b)
            return openshell_pb2.SandboxResponse(sandbox=self.sandbox_msg(b))

    def ListSandboxes(self, request, context):
        self.enter("ListSandboxes", context)
        with self.lock:
            names = sorted(self.boxes)
            limit = request.limit or 100
            page = names[request.offset : request.offset + limit]
            return openshell_pb2.ListSandboxesResponse(
                sandboxes=[self.sandbox_msg(self.boxes[n]) for n in page]
            )

    def CreateSandbox(self, request, context):
        fl = self.enter("CreateSandbox", context, request.name)
        with self.lock:
            if request.name in self.boxes:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS, f"sandbox '{request.name}' already exists"
                )
            spec = request.spec
            b = {
                "id": str(uuid.uuid4()),
                "name": request.name,
                "created_ms": int(time.time() * 1000),
                "resource_version": 1,
                "labels": dict(request.labels),
                "image": spec.template.image,
                "policy": spec.policy if spec.HasField("policy") else default_policy(),
                "policy_version": 1,
                # Whether the request carried a GPU requirement at all (`--gpu` without a
                # count sends one with count 0: "the default number").
                "gpu": spec.HasField("resource_requirements")
                and spec.resource_requirements.HasField("gpu"),
                "gpu_count": spec.resource_requirements.gpu.count,
                "providers": list(spec.providers),
                "phase": PROVISIONING,
                "create_error": bool(fl.get("create_error")),
                "deleting_left": 0,
            }
            os.makedirs(os.path.join(self.root(b), ".openclaw"), mode=0o700)
            self.boxes[request.name] = b
            self.save()
            return openshell_pb2.SandboxResponse(sandbox=self.sandbox_msg(b))

    def provisioned(self, b):
        """Provisioning finishes by the first time anyone looks (watch or get), whether or not
        the creating client is still watching."""
        if b["phase"] == PROVISIONING:
            b["phase"] = ERROR if b["create_error"] else READY
            b["resource_version"] += 1
            self.save()

    def WatchSandbox(self, request, context):
        self.enter("WatchSandbox", context)
        with self.lock:
            b = self.by_id(request.id, context)
            self.provisioned(b)
            msg = self.sandbox_msg(b)
        yield openshell_pb2.SandboxStreamEvent(sandbox=msg)

    def remove(self, name):
        b = self.boxes.pop(name)
        shutil.rmtree(self.root(b), ignore_errors=True)
        self.save()

    def DeleteSandbox(self, request, context):
        fl = self.enter("DeleteSandbox", context, request.name)
        with self.lock:
            b = self.by_name(request.name, context)
            polls = int(fl.get("delete_polls", 0))
            if polls > 0:
                b["phase"] = DELETING
                b["deleting_left"] = polls
                self.save()
            else:
                self.remove(request.name)
            return openshell_pb2.DeleteSandboxResponse(deleted=True)

    # Providers are configured by the test: `providers.json`, a list of names.
    def provider_names(self):
        try:
            with open(os.path.join(self.state, "providers.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return []

    def provider_msg(self, name):
        p = datamodel_pb2.Provider(type="nvidia")
        p.metadata.name = name
        return p

    def GetProvider(self, request, context):
        self.enter("GetProvider", context, request.name)
        if request.name not in self.provider_names():
            context.abort(grpc.StatusCode.NOT_FOUND, f"provider '{request.name}' not found")
        return openshell_pb2.ProviderResponse(provider=self.provider_msg(request.name))

    def ListProviders(self, request, context):
        # `sandbox create --provider` lists providers first to check the names it was given.
        self.enter("ListProviders", context)
        names = self.provider_names()[request.offset :]
        if request.limit:
            names = names[: request.limit]
        return openshell_pb2.ListProvidersResponse(providers=[self.provider_msg(n) for n in names])

    def CreateSshSession(self, request, context):
        self.enter("CreateSshSession", context)
        with self.lock:
            b = self.by_id(request.sandbox_id, context)
            return openshell_pb2.CreateSshSessionResponse(
                sandbox_id=b["id"],
                token=uuid.uuid4().hex,
                gateway_host="127.0.0.1",
                gateway_port=self.port,
                gateway_scheme="http",
            )

    def ExecSandbox(self, request, context):
        """`sandbox exec`: as the v0.0.111 gateway, the argv is joined into one shell string
        (each argument single-quoted unless it is plain `[A-Za-z0-9./_-]+`; a NUL byte, or a
        joined command over 256 KiB, refused with INVALID_ARGUMENT) and run with `sh -c` inside the
        sandbox (here: in its directory, with `/sandbox` paths rewritten to it, as the fake
        `ssh` does), `stdin` fed to it; its output streams back as `stdout`/`stderr` events,
        then one `exit` event. `timeout_seconds` kills it and exits 124. Faults:
        `"exec_cut": N` ends the stream N bytes before the end of the output and without the
        exit event (a stream cut short: the CLI then exits 0); `"exec_flip": N` inverts the
        byte N bytes before the end of the output; with `"exec_skip": K` either applies to the
        (K+1)-th ExecSandbox call only (counted in `exec.count`), else to every call.
        `"exec_without": ["python3"]` runs the command with a PATH holding only the usual
        tools of a sandbox image minus those named (an image without them)."""
        fl = self.enter("ExecSandbox", context)
        with self.lock:
            b = self.by_id(request.sandbox_id, context)
            root = self.root(b)
        if not request.command:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "command is required")
        for arg in list(request.command) + [request.workdir]:
            if "\0" in arg:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "command contains a NUL byte")
        joined = " ".join(shell_quote(a) for a in request.command)
        if request.workdir:
            joined = "cd " + shell_quote(request.workdir) + " && " + joined
        # Stricter than an argument-by-argument bound (Linux caps one argv string at 128 KiB
        # anyway): the joined command itself may not pass 256 KiB.
        if len(joined.encode()) > 256 * 1024:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "command is too long")
        with open(os.path.join(self.state, "exec.log"), "a") as f:
            f.write(json.dumps({"command": list(request.command), "stdin": len(request.stdin),
                                "timeout": request.timeout_seconds}) + "\n")
        command = re.sub(r"(?<![\w/.-])/sandbox(?=/|\s|'|\"|$)", root, joined)
        timeout = request.timeout_seconds or None
        env = dict(os.environ)
        if fl.get("exec_without"):
            env["PATH"] = self.bin_without(fl["exec_without"])
        try:
            r = subprocess.run(["sh", "-c", command], cwd=root, input=request.stdin, env=env,
                               capture_output=True, timeout=timeout, start_new_session=True)
            out, err, code = r.stdout, r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            out, err, code = e.stdout or b"", e.stderr or b"", 124
        if code < 0:
            code = 128 - code
        counter = os.path.join(self.state, "exec.count")
        try:
            with open(counter) as f:
                n = int(f.read().strip() or "0")
        except (OSError, ValueError):
            n = 0
        with open(counter, "w") as f:
            f.write(str(n + 1))
        if "exec_skip" in fl and n != int(fl["exec_skip"]):
            fl = {}
        flip = fl.get("exec_flip")
        if flip is not None and 0 < int(flip) <= len(out):
            i = len(out) - int(flip)
            out = out[:i] + bytes([out[i] ^ 0xFF]) + out[i + 1 :]
        cut = fl.get("exec_cut")
        if cut is not None:
            out = out[: max(0, len(out) - int(cut))]
        for i in range(0, len(out), 64 * 1024):
            yield openshell_pb2.ExecSandboxEvent(
                stdout=openshell_pb2.ExecSandboxStdout(data=out[i : i + 64 * 1024]))
        if err:
            yield openshell_pb2.ExecSandboxEvent(stderr=openshell_pb2.ExecSandboxStderr(data=err))
        if cut is None:
            yield openshell_pb2.ExecSandboxEvent(exit=openshell_pb2.ExecSandboxExit(exit_code=code))

    TOOLS = ["sh", "find", "sha256sum", "xargs", "dd", "chmod", "touch", "ln", "cat", "echo",
             "printf", "head", "od", "wc", "sleep", "tar", "mkdir", "pwd", "realpath", "python3"]

    def bin_without(self, missing):
        """A directory of links to the usual tools but `missing`, for a PATH."""
        d = os.path.join(self.state, "bin-without-" + "-".join(sorted(missing)))
        if not os.path.isdir(d):
            os.makedirs(d + ".tmp", exist_ok=True)
            for tool in self.TOOLS:
                found = shutil.which(tool)
                if found and tool not in missing:
                    link = os.path.join(d + ".tmp", tool)
                    if not os.path.lexists(link):
                        os.symlink(found, link)
            os.replace(d + ".tmp", d)
        return d

    def GetSandboxConfig(self, request, context):
        self.enter("GetSandboxConfig", context)
        with self.lock:
            b = self.by_id(request.sandbox_id, context)
            if self.faults().get("no_policy"):
                return sandbox_pb2.GetSandboxConfigResponse()
            return sandbox_pb2.GetSandboxConfigResponse(
                policy=b["policy"],
                version=b["policy_version"],
                policy_hash=self.policy_hash(b["policy"]),
                config_revision=b["policy_version"],
                policy_source=SOURCE_SANDBOX,
            )

    def GetSandboxPolicyStatus(self, request, context):
        self.enter("GetSandboxPolicyStatus", context, request.name)
        with self.lock:
            b = self.by_name(request.name, context)
            rev = openshell_pb2.SandboxPolicyRevision(
                version=b["policy_version"],
                policy_hash=self.policy_hash(b["policy"]),
                status=LOADED,
                policy=b["policy"],
            )
            return openshell_pb2.GetSandboxPolicyStatusResponse(
                revision=rev, active_version=b["policy_version"]
            )

    def UpdateConfig(self, request, context):
        self.enter("UpdateConfig", context, request.name)
        with self.lock:
            b = self.by_name(request.name, context)
            new, old = request.policy, b["policy"]
            # As the v0.0.111 gateway: static fields of a live sandbox stay as they are.
            if old.HasField("filesystem") and not new.HasField("filesystem"):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "filesystem policy cannot be removed on a live sandbox",
                )
            if new.HasField("filesystem"):
                missing = [p for p in old.filesystem.read_only if p not in new.filesystem.read_only]
                missing += [p for p in old.filesystem.read_write if p not in new.filesystem.read_write]
                if missing:
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "filesystem paths cannot be removed on a live sandbox",
                    )
            for field in ("landlock", "process"):
                if getattr(new, field) != getattr(old, field):
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{field} policy cannot be changed on a live sandbox",
                    )
            if self.policy_hash(new) != self.policy_hash(old):
                b["policy"] = new
                b["policy_version"] += 1
                self.save()
            return openshell_pb2.UpdateConfigResponse(
                version=b["policy_version"], policy_hash=self.policy_hash(b["policy"])
            )

PLAIN_ARG = re.compile(r"[A-Za-z0-9./_-]+")


def shell_quote(arg):
    """One argument of the joined command, as the gateway quotes it."""
    if PLAIN_ARG.fullmatch(arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


H2_PREFACE = b"PRI * HTTP/2.0"


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve_connection(conn, grpc_port, gw):
    head = b""
    try:
        while len(head) < len(H2_PREFACE) and b"\r\n" not in head:
            data = conn.recv(len(H2_PREFACE) - len(head))
            if not data:
                conn.close()
                return
            head += data
    except OSError:
        conn.close()
        return
    if head.startswith(H2_PREFACE):
        back = socket.create_connection(("127.0.0.1", grpc_port))
        back.sendall(head)
        threading.Thread(target=pump, args=(back, conn), daemon=True).start()
        pump(conn, back)
        return
    # HTTP/1.1: read the request head, answer /healthz, close.
    try:
        conn.settimeout(5)
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                break
            head += data
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        with open(os.path.join(gw.state, "calls.log"), "a") as f:
            f.write(json.dumps({"method": "HTTP " + line, "name": ""}) + "\n")
        if line.startswith("GET /healthz "):
            code = int(gw.faults().get("healthz", 200))
        else:
            code = 404
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(code, "Status")
        body = b"ok" if code == 200 else reason.encode()
        conn.sendall(
            f"HTTP/1.1 {code} {reason}\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n".encode() + body
        )
    except OSError:
        pass
    finally:
        conn.close()


def front(listener, grpc_port, gw):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve_connection, args=(conn, grpc_port, gw), daemon=True).start()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.state, exist_ok=True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(64)
    port = listener.getsockname()[1]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    gw = Gateway(args.state, port)
    gw.save()
    openshell_pb2_grpc.add_OpenShellServicer_to_server(gw, server)
    server.start()
    threading.Thread(target=front, args=(listener, grpc_port, gw), daemon=True).start()
    tmp = os.path.join(args.state, "port.tmp")
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, os.path.join(args.state, "port"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()
    while not stop.wait(0.2):
        if os.getppid() != parent:
            break
    server.stop(0)
    sys.exit(0)


if __name__ == "__main__":
    main()
