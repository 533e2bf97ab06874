#!/usr/bin/env python3
"""artifactfs beside the machine's limits and beside the peers a user would pick (issue 6).

Run through scripts/bench/run.sh (installs the peers). One run, every figure measured side by
side in it, cases interleaved round after round (the tools' order rotated each round), the
median of ROUNDS reported. Needs root (page cache drops, mounts) and /dev/fuse.

Columns:
  limit       the same bytes without a FUSE tool (curl from nginx, a local file, local disk)
  artifactfs  `artifactfs mount` over `artifactfs serve DATA`
  rclone      `rclone mount :webdav: --vfs-cache-mode full` over nginx (WebDAV, sendfile on)
  httpdirfs   `httpdirfs` over nginx's HTML index (with or without its cache: the faster of
              the two in a calibration before the rounds)
  s3fs        `s3fs -o use_cache=DIR` over the S3 test server (s3s-fs, examples/bench_servers)

"Cold" = a fresh mount with a new (empty) cache directory and the kernel page cache dropped.
Memory = peak RssAnon and VmRSS of the daemon, sampled every 100 ms from /proc/PID/status.

Environment: BENCH_SIZE_MIB (1024), BENCH_FOUR_MIB (= SIZE), BENCH_FILES (10000),
BENCH_ROUNDS (5), BENCH_DIR (/tmp/afs-bench-peers), BENCH_KEEP (0; 1 keeps BENCH_DIR),
BENCH_CASE_TIMEOUT (600 s), BENCH_FIO_RUNTIME (10 s), BENCH_OUT_DIR (target/bench),
BENCH_CHART (docs/bench-peers.png), ARTIFACTFS_BIN (target/release/artifactfs).

`peers.py --report target/bench/peers.json` renders a saved run's table, notes and chart again
(nothing is measured; for changes to the report).
"""

import base64
import contextlib
import datetime
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

# `peers.py --report PEERS.json` renders a saved run's table, notes and chart again (after a
# change to the report only); the run's config stands in for the environment below.
SAVED = None
if len(sys.argv) > 2 and sys.argv[1] == "--report":
    with open(sys.argv[2]) as _f:
        SAVED = json.load(_f)
    for _key, _env in (("size_mib", "BENCH_SIZE_MIB"), ("four_mib", "BENCH_FOUR_MIB"), ("files", "BENCH_FILES"),
                       ("rounds", "BENCH_ROUNDS"), ("fio_runtime", "BENCH_FIO_RUNTIME"),
                       ("case_timeout", "BENCH_CASE_TIMEOUT"), ("settle_s", "BENCH_SETTLE_S"),
                       ("dropped_pairs", "BENCH_DROPPED_PAIRS")):
        if _key in SAVED["config"]:
            os.environ[_env] = str(SAVED["config"][_key])

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
WORK = os.path.abspath(os.environ.get("BENCH_DIR", "/tmp/afs-bench-peers"))
SIZE_MIB = int(os.environ.get("BENCH_SIZE_MIB", "1024"))
FOUR_MIB = int(os.environ.get("BENCH_FOUR_MIB", str(SIZE_MIB)))
FILES = int(os.environ.get("BENCH_FILES", "10000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
KEEP = os.environ.get("BENCH_KEEP", "0") == "1"
TIMEOUT = float(os.environ.get("BENCH_CASE_TIMEOUT", "600"))
FIO_RUNTIME = int(os.environ.get("BENCH_FIO_RUNTIME", "10"))
OUT_DIR = os.path.abspath(os.environ.get("BENCH_OUT_DIR", os.path.join(ROOT, "target", "bench")))
CHART = os.path.abspath(os.environ.get("BENCH_CHART", os.path.join(ROOT, "docs", "bench-peers.png")))
BIN_SRC = os.environ.get("ARTIFACTFS_BIN", os.path.join(ROOT, "target", "release", "artifactfs"))
EXAMPLE = os.environ.get("BENCH_SERVERS_BIN", os.path.join(ROOT, "target", "release", "examples", "bench_servers"))

SIZE = SIZE_MIB << 20
FOUR = FOUR_MIB << 20
CAL = min(SIZE, 32 << 20)  # bytes read by the httpdirfs calibration
GIB = 1 << 30
TOOLS = ["artifactfs", "rclone", "httpdirfs", "s3fs"]
COLS = ["limit"] + TOOLS
DATA = os.path.join(WORK, "data")
BIG = "big.bin"
READERS = [f"r{i}.bin" for i in range(4)]
BIN = os.path.join(WORK, "bin", "artifactfs")  # a copy: a rebuild during the run changes nothing
BUF = bytearray(1 << 20)


# ---------------------------------------------------------------------------------------------
# Child modes: reads timed inside a child process, so that a hung mount costs a kill, not the run.

def child_mode(argv):
    """Runs a child mode. A read the tool fails (EIO from a peer, a mount gone) exits 1 with
    one line naming the error and where it happened, which the table shows as the reason;
    not a Python traceback."""
    try:
        return child_mode_run(argv)
    except OSError as e:
        print(f"{argv[1][2:]} of {os.path.basename(argv[2])} failed: {e.strerror or e} (errno {e.errno})",
              file=sys.stderr)
        return 1


def child_mode_run(argv):
    mode, path = argv[1], argv[2]
    if mode == "--cat":
        limit = int(argv[3]) if len(argv) > 3 else None
        n = 0
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while limit is None or n < limit:
                k = f.readinto(BUF)
                if not k:
                    break
                n += k
        print(json.dumps({"t": time.perf_counter() - t, "bytes": n}))
    elif mode == "--ttfb":
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            b = f.read(1)
            dt = time.perf_counter() - t
        print(json.dumps({"t": dt, "bytes": len(b)}))
    elif mode == "--hold":
        with open(path, "rb", buffering=0) as f:
            f.read(1)
            time.sleep(float(argv[3]))
    return 0


# ---------------------------------------------------------------------------------------------
# Processes

class Fail(Exception):
    """A measurement (or a mount, or a server) failed; the reason goes into the table."""

    def __init__(self, msg, timeout=False):
        super().__init__(msg)
        self.timeout = timeout


STARTED = []  # long-running processes we started (Popen), killed at the end by pid
MOUNTS = set()  # mount points we mounted


def tail(text, n=200):
    text = " ".join(text.decode(errors="replace").split()) if isinstance(text, bytes) else " ".join(text.split())
    return text[-n:]


class Child:
    """A child process, waited for by a thread (so a timeout never blocks the run)."""

    def __init__(self, cmd, shell=False, env=None, quiet=False):
        self.cmd = cmd
        self.out = subprocess.DEVNULL if quiet else tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.done = threading.Event()
        self.t0 = time.perf_counter()
        self.p = subprocess.Popen(
            cmd, shell=shell, env=env, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err,
            start_new_session=True,
        )
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self):
        _, status, ru = os.wait4(self.p.pid, 0)
        self.elapsed = time.perf_counter() - self.t0
        self.end = self.t0 + self.elapsed
        self.rc = os.waitstatus_to_exitcode(status)
        self.p.returncode = self.rc
        self.cpu = ru.ru_utime + ru.ru_stime
        self.done.set()

    def result(self, timeout=None, mnt=None, what=None):
        what = what or os.path.basename(str(self.cmd[0] if isinstance(self.cmd, list) else self.cmd.split()[0]))
        timeout = TIMEOUT if timeout is None else timeout
        if not self.done.wait(timeout):
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except OSError:
                pass
            if mnt:
                abort_mount(mnt)
            self.done.wait(30)
            raise Fail(f"{what}: timeout after {timeout:.0f} s", timeout=True)
        self.stderr = b""
        self.err.seek(0)
        self.stderr = self.err.read()
        self.stdout = b""
        if self.out is not subprocess.DEVNULL:
            self.out.seek(0)
            self.stdout = self.out.read()
        if self.rc != 0:
            raise Fail(f"{what} exited {self.rc}: {tail(self.stderr) or tail(self.stdout)}")
        return self


def run(cmd, timeout=None, mnt=None, what=None, **kw):
    return Child(cmd, **kw).result(timeout, mnt, what)


def span(kids, mnt=None, what=None):
    """Waits for children started together; seconds from the first start to the last end."""
    for k in kids:
        k.result(mnt=mnt, what=what)
    return max(k.end for k in kids) - min(k.t0 for k in kids)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# Seconds between the page-cache drop and a "page cache dropped" read (see settled_drop).
SETTLE = float(os.environ.get("BENCH_SETTLE_S", "4"))
# "Page cache dropped" pairs (tool, local file) per tool and round: single reads after a drop
# swing from 0.3 s to 1.6 s on this VM, and the median of five pairs swung with them.
DROPPED_PAIRS = int(os.environ.get("BENCH_DROPPED_PAIRS", "3"))


def settled_drop():
    """Drops the page cache, then waits until the freed memory has gone back to the host.

    On a VM with free page reporting, memory freed by the drop is handed back to the host
    about 2 s later, and a read that then allocates it runs at half speed (a local 1 GiB file:
    0.31 s right after a drop, 0.70 s 4 s later). Right after a drop, which reader gets the
    memory not yet handed back depends on what the step before freed, not on the reader.
    """
    drop_caches()
    time.sleep(SETTLE)


def mountinfo():
    with open("/proc/self/mountinfo") as f:
        return [line.split() for line in f]


def is_mounted(mnt):
    return any(fields[4] == mnt for fields in mountinfo())


def abort_mount(mnt):
    """Ends a hung FUSE connection (/sys/fs/fuse/connections/N/abort) and detaches the mount."""
    for fields in mountinfo():
        if fields[4] == mnt:
            minor = fields[2].split(":")[1]
            try:
                with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                    f.write("1")
            except OSError:
                pass
    subprocess.run(["umount", "-l", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pid_alive(pid):
    return os.path.exists(f"/proc/{pid}")


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Peak RssAnon and VmRSS of a process, every 100 ms."""

    def __init__(self, pid):
        self.pid, self.anon, self.rss, self.on = pid, 0, 0, True
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while self.on:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) * 1024)
                self.rss = max(self.rss, int(fields["VmRSS"].split()[0]) * 1024)
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.1)

    def stop(self):
        self.on = False
        self.t.join()
        return self.anon, self.rss


# ---------------------------------------------------------------------------------------------
# Data

def random_file(path, nbytes):
    with open(path, "wb") as f:
        left = nbytes
        while left:
            k = min(left, 1 << 20)
            f.write(os.urandom(k))
            left -= k


def tree_names():
    per = max(1, FILES // 100)
    return [f"tree/d{d:03}/f{i:05}.dat" for d in range(100) for i in range(per)]


def make_data():
    os.makedirs(DATA, exist_ok=True)
    for name, size in [(BIG, SIZE)] + [(r, FOUR) for r in READERS]:
        p = os.path.join(DATA, name)
        if not os.path.exists(p) or os.path.getsize(p) != size:
            log(f"creating {name} ({size >> 20} MiB of random bytes)")
            random_file(p, size)
    marker = os.path.join(WORK, f"tree-{FILES}.done")
    if not os.path.exists(marker):
        log(f"creating the tree: {len(tree_names())} files of 4 KiB in 100 folders")
        shutil.rmtree(os.path.join(DATA, "tree"), ignore_errors=True)
        for name in tree_names():
            p = os.path.join(DATA, name)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(os.urandom(4096))
        open(marker, "w").close()


def etags():
    """MD5 of every object, for the S3 server's sidecars (computed once, kept with the data)."""
    path = os.path.join(WORK, "etags.json")
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    out = {}
    for name in [BIG] + READERS + tree_names():
        p = os.path.join(DATA, name)
        st = os.stat(p)
        stamp = f"{st.st_size}-{st.st_mtime_ns}"
        if known.get(name, {}).get("stamp") == stamp:
            out[name] = known[name]
            continue
        h = hashlib.md5()
        with open(p, "rb") as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
        out[name] = {"stamp": stamp, "md5": h.hexdigest()}
    with open(path, "w") as f:
        json.dump(out, f)
    return {k: v["md5"] for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Servers

class Servers:
    afs_url = nginx_url = None
    s3 = None  # dict(endpoint, bucket, key, secret, root)
    s3_error = None


SRV = Servers()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_lines_until(stream, stop, timeout):
    lines, box = [], {}

    def go():
        try:
            for line in stream:
                lines.append(line)
                if stop(line):
                    box["ok"] = True
                    return
        except Exception as e:  # noqa: BLE001
            box["err"] = repr(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    return lines, box.get("ok", False)


def drain(stream, path):
    def go():
        with open(path, "a") as f:
            for line in stream:
                f.write(line)

    threading.Thread(target=go, daemon=True).start()


def start_afs():
    logf = open(os.path.join(WORK, "logs", "afs-serve.log"), "ab")
    p = subprocess.Popen(
        [BIN, "serve", DATA, "--listen", "127.0.0.1:0", "--state-dir", os.path.join(WORK, "afs-state")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf, text=True,
    )
    STARTED.append(p)
    lines, ok = read_lines_until(p.stdout, lambda line: "http://" in line, 30)
    if not ok:
        raise SystemExit(f"artifactfs serve did not start: {lines}, see {WORK}/logs/afs-serve.log")
    drain(p.stdout, os.path.join(WORK, "logs", "afs-serve.out"))
    SRV.afs_url = lines[-1].split()[-1].rstrip("/")


def start_nginx():
    ng = os.path.join(WORK, "nginx")
    for d in ("logs", "tmp"):
        os.makedirs(os.path.join(ng, d), exist_ok=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(511)
    # Non-blocking, as nginx expects of a socket it inherits (it does not set it itself): with
    # a blocking one, a worker stalls in accept() with its keep-alive connections waiting.
    sock.setblocking(False)
    port = sock.getsockname()[1]
    module = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so"
    if not os.path.exists(module):
        raise SystemExit(f"{module} missing: apt-get install nginx-extras (run.sh does)")
    conf = f"""load_module {module};
daemon off;
master_process on;
worker_processes 2;
user root;
pid {ng}/nginx.pid;
error_log {ng}/logs/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path {ng}/tmp;
  client_max_body_size 0;
  types {{ application/octet-stream bin; application/octet-stream dat; }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {DATA};
    location / {{
      dav_methods PUT DELETE MKCOL COPY MOVE;
      dav_ext_methods PROPFIND OPTIONS;
      dav_access user:rw group:r all:r;
      create_full_put_path on;
      autoindex on;
      autoindex_exact_size on;
    }}
  }}
}}
"""
    with open(os.path.join(ng, "nginx.conf"), "w") as f:
        f.write(conf)
    fd = sock.fileno()
    p = subprocess.Popen(
        ["nginx", "-c", os.path.join(ng, "nginx.conf"), "-p", ng, "-e", os.path.join(ng, "logs", "error.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "NGINX": f"{fd};"}, pass_fds=(fd,),
    )
    STARTED.append(p)
    sock.close()
    SRV.nginx_url = f"http://127.0.0.1:{port}"
    end = time.time() + 10
    while True:
        try:
            urllib.request.urlopen(SRV.nginx_url + "/", timeout=2).read()
            return
        except OSError:
            if time.time() > end or p.poll() is not None:
                raise SystemExit(f"nginx did not start, see {ng}/logs/error.log")
            time.sleep(0.05)


def start_s3(md5):
    """The S3 test server (s3s-fs, in examples/bench_servers) over the same files: they are
    hard-linked into its bucket folder with sidecars holding their ETags (else s3s-fs would
    hash each object on every GET/HEAD)."""
    if not os.path.exists(EXAMPLE):
        raise Fail("target/release/examples/bench_servers is not built (cargo build --release --example "
                   "bench_servers); it runs the S3 test server s3s-fs")
    tmp = os.path.join(WORK, "s3tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dummy = os.path.join(WORK, "s3-dummy.txt")
    with open(dummy, "w") as f:
        f.write("dummy\n")
    logf = open(os.path.join(WORK, "logs", "s3-server.log"), "ab")
    p = subprocess.Popen([EXAMPLE, dummy], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf, text=True,
                         env={**os.environ, "TMPDIR": tmp})
    STARTED.append(p)
    lines, ok = read_lines_until(p.stdout, lambda line: line.strip() == "ready", 60)
    if not ok:
        raise Fail(f"the S3 test server did not start: {tail(''.join(lines))} (see {WORK}/logs/s3-server.log)")
    info = {}
    for line in lines:
        if " " in line:
            k, rest = line.split(" ", 1)
            info[k] = rest.split()
    endpoint, bucket, key, secret = info["s3"]
    roots = [d for d in glob.glob(os.path.join(tmp, ".tmp*")) if os.path.isdir(os.path.join(d, bucket))]
    if len(roots) != 1:
        raise Fail(f"cannot find the S3 server's folder under {tmp}")
    root = roots[0]

    def enc(s):
        return base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")

    for name, digest in md5.items():
        dst = os.path.join(root, bucket, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.link(os.path.join(DATA, name), dst)
        with open(os.path.join(root, f".bucket-{enc(bucket)}.object-{enc(name)}.internal.json"), "w") as f:
            json.dump({"e_tag": digest}, f)
    # Folder keys ("tree", "tree/", "tree/d000", ...): s3s-fs answers a HEAD of a key that is a
    # folder on its disk with 500 (it tries to hash the folder), which s3fs retries for seconds
    # per folder; with these sidecars it answers 200 with the content type of a folder marker
    # (what `s3fs mkdir` or a console "create folder" makes on S3).
    folders = sorted({os.path.dirname(n) for n in md5 if "/" in n} | {"tree"})
    for d in folders:
        for k in (d, d + "/"):
            with open(os.path.join(root, f".bucket-{enc(bucket)}.object-{enc(k)}.internal.json"), "w") as f:
                json.dump({"e_tag": "d41d8cd98f00b204e9800998ecf8427e"}, f)
            with open(os.path.join(root, f".bucket-{enc(bucket)}.object-{enc(k)}.metadata.json"), "w") as f:
                json.dump({"content_type": "application/x-directory"}, f)
    passwd = os.path.join(WORK, "s3fs.passwd")
    with open(passwd, "w") as f:
        f.write(f"{key}:{secret}\n")
    os.chmod(passwd, 0o600)
    SRV.s3 = dict(endpoint=endpoint, bucket=bucket, key=key, secret=secret, root=root, passwd=passwd, proc=p)


def s3_curl_args():
    s = SRV.s3
    return ["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{s['key']}:{s['secret']}",
            "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]


def server_get(server, name):
    """(url, extra curl args) of NAME on SERVER: 'afs', 'nginx' or 's3'."""
    if server == "afs":
        return f"{SRV.afs_url}/{name}", []
    if server == "nginx":
        return f"{SRV.nginx_url}/{name}", []
    if SRV.s3 is None:
        raise Fail(f"no S3 server: {SRV.s3_error}")
    return f"{SRV.s3['endpoint']}/{SRV.s3['bucket']}/{name}", s3_curl_args()


def server_path(tool, name):
    if tool == "s3fs":
        return os.path.join(SRV.s3["root"], SRV.s3["bucket"], name)
    return os.path.join(DATA, name)


OWN_SERVER = {"artifactfs": "afs", "rclone": "nginx", "httpdirfs": "nginx", "s3fs": "s3"}
SERVER_NAME = {"afs": "artifactfs serve", "nginx": "nginx", "s3": "s3s-fs"}


# ---------------------------------------------------------------------------------------------
# Mounts

HTTPDIRFS_CACHE = True  # set by the calibration
CACHE_SEQ = [0]


class Mounted:
    def __init__(self, tool, mnt, cache, pid, proc=None):
        self.tool, self.mnt, self.cache, self.pid, self.proc = tool, mnt, cache, pid, proc
        self.dead = None

    def path(self, name):
        return os.path.join(self.mnt, name)


def new_cache():
    CACHE_SEQ[0] += 1
    d = os.path.join(WORK, "caches", f"c{CACHE_SEQ[0]}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def max_cache_gib():
    return max(8, math.ceil(2 * (SIZE + 4 * FOUR) / GIB))


def mount(tool, cache=None, passthrough=True):
    mnt = os.path.join(WORK, "mnt", tool)
    os.makedirs(mnt, exist_ok=True)
    if is_mounted(mnt):
        force_unmount(mnt)
    cache = cache or new_cache()
    logp = os.path.join(WORK, "logs", f"{tool}.log")
    MOUNTS.add(mnt)
    if tool == "artifactfs":
        args = [BIN, "mount", SRV.afs_url, mnt, "--cache-dir", cache, "--max-cache-size", f"{max_cache_gib()}G",
                "--log-file", logp]
        if not passthrough:
            args.append("--passthrough=false")
        run(args, timeout=120, what="artifactfs mount")
        st = json.loads(run([BIN, "status", mnt, "--json"], timeout=30, what="artifactfs status").stdout)
        m = Mounted(tool, mnt, cache, st["pid"])
        m.status = st
    else:
        logf = open(logp, "ab")
        if tool == "rclone":
            if not shutil.which("rclone"):
                raise Fail("rclone is not installed")
            conf = os.path.join(WORK, "rclone.conf")
            open(conf, "a").close()
            args = ["rclone", "mount", ":webdav:", mnt, "--webdav-url", SRV.nginx_url, "--vfs-cache-mode", "full",
                    "--cache-dir", cache, "--config", conf]
        elif tool == "httpdirfs":
            if not shutil.which("httpdirfs"):
                raise Fail("httpdirfs is not installed")
            # --no-range-check: httpdirfs 1.2.5 wrongly finds that nginx lacks ranges without it
            args = ["httpdirfs", "-f", "--no-range-check"]
            if HTTPDIRFS_CACHE:
                args += ["--cache", "--cache-location", cache]
            args += [SRV.nginx_url + "/", mnt]
        elif tool == "s3fs":
            if not shutil.which("s3fs"):
                raise Fail("s3fs is not installed")
            if SRV.s3 is None:
                raise Fail(f"no S3 server: {SRV.s3_error}")
            s = SRV.s3
            args = ["s3fs", s["bucket"], mnt, "-f", "-o",
                    f"url={s['endpoint']},use_path_request_style,passwd_file={s['passwd']},use_cache={cache},"
                    "dbglevel=warn"]
        else:
            raise ValueError(tool)
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        STARTED.append(p)
        m = Mounted(tool, mnt, cache, p.pid, p)
    end = time.time() + 60
    while not is_mounted(mnt):
        if (m.proc is not None and m.proc.poll() is not None) or time.time() > end:
            reason = f"{tool} did not mount" + (f" (exit {m.proc.returncode})" if m.proc and m.proc.poll() is not None else "")
            force_unmount(mnt, m)
            raise Fail(f"{reason}: {log_tail(logp)}")
        time.sleep(0.02)
    try:
        run(["stat", mnt], timeout=60, mnt=mnt, what="stat of the mount point")
    except Fail:
        force_unmount(mnt, m)
        raise
    return m


def log_tail(path, n=160):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4000))
            return tail(f.read(), n)
    except OSError:
        return ""


def force_unmount(mnt, m=None):
    abort_mount(mnt)
    if m is not None and pid_alive(m.pid):
        try:
            os.kill(m.pid, signal.SIGKILL)
        except OSError:
            pass


def unmount(m, keep_cache=False):
    ok = True
    try:
        if m.dead or not is_mounted(m.mnt):
            pass  # aborted after a timeout: only the process is left to end
        elif m.tool == "artifactfs":
            run([BIN, "unmount", m.mnt], timeout=180, what="artifactfs unmount")
        else:
            try:
                run(["fusermount3", "-u", m.mnt], timeout=60, what="fusermount3 -u")
            except Fail:
                run(["umount", m.mnt], timeout=60, what="umount")
        end = time.time() + 30
        while pid_alive(m.pid) and time.time() < end:
            if m.proc is not None and m.proc.poll() is not None:
                break
            time.sleep(0.02)
    except Fail as e:
        log(f"unmount of {m.mnt}: {e}; forcing it")
        ok = False
    if is_mounted(m.mnt) or pid_alive(m.pid) and (m.proc is None or m.proc.poll() is None):
        force_unmount(m.mnt, m)
    if m.proc is not None:
        try:
            m.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    if not keep_cache:
        shutil.rmtree(m.cache, ignore_errors=True)
    return ok


# ---------------------------------------------------------------------------------------------
# Recording

R = {}  # case -> column -> [values]
FAILS = {}  # case -> column -> [reasons]
SKIP = {}  # (case, column) -> reason: a timeout is not retried in later rounds
NA = {}  # (case, column) -> reason: not applicable


def put(case, col, value):
    R.setdefault(case, {}).setdefault(col, []).append(value)


def fail(case, col, reason):
    FAILS.setdefault(case, {}).setdefault(col, []).append(reason)
    log(f"FAIL {case} / {col}: {reason}")


CURRENT = [None]  # the mount a with_mount body runs on


def rec(case, col, fn):
    """Runs one measurement; a failure is recorded (with its reason), never raised."""
    if (case, col) in SKIP:
        return None
    m = CURRENT[0]
    if m is not None and m.dead:
        fail(case, col, f"not run: {m.dead}")
        return None
    try:
        v = fn()
    except Fail as e:
        fail(case, col, str(e))
        if e.timeout:
            SKIP[(case, col)] = f"{e} (not retried in later rounds)"
            if m is not None:
                m.dead = f"the mount was aborted after `{case}` timed out"
        return None
    except Exception as e:  # noqa: BLE001
        fail(case, col, f"{type(e).__name__}: {e}")
        return None
    if v is not None:
        put(case, col, v)
    return v


def with_mount(tool, cases, body, cache=None, keep_cache=False, passthrough=True):
    live = [c for c in cases if (c, tool) not in SKIP]
    if not live:
        return
    try:
        m = mount(tool, cache=cache, passthrough=passthrough)
    except Fail as e:
        for c in live:
            fail(c, tool, f"mount failed: {e}")
        return
    except Exception as e:  # noqa: BLE001
        for c in live:
            fail(c, tool, f"mount failed: {type(e).__name__}: {e}")
        return
    CURRENT[0] = m
    try:
        body(m)
    except Fail as e:
        for c in live:
            fail(c, tool, str(e))
    finally:
        CURRENT[0] = None
        unmount(m, keep_cache=keep_cache)


def cat(path, expect, mnt=None, limit=None):
    args = [sys.executable, os.path.abspath(__file__), "--cat", path] + ([str(limit)] if limit else [])
    out = json.loads(run(args, mnt=mnt, what="read").stdout)
    if out["bytes"] != expect:
        raise Fail(f"short read: {out['bytes']} of {expect} bytes")
    return out["t"]


def ttfb(path, mnt=None):
    out = json.loads(run([sys.executable, os.path.abspath(__file__), "--ttfb", path], mnt=mnt, what="first byte").stdout)
    if out["bytes"] != 1:
        raise Fail("no first byte")
    return out["t"]


def fio(path, jobs, mnt=None):
    c = run(["fio", "--name=rand", f"--filename={path}", "--readonly", "--ioengine=psync", "--rw=randread",
             "--bs=4k", "--randrepeat=0", "--direct=0", "--invalidate=0", "--time_based", f"--runtime={FIO_RUNTIME}",
             f"--numjobs={jobs}", "--group_reporting", "--output-format=json"],
            timeout=FIO_RUNTIME + TIMEOUT, mnt=mnt, what="fio")
    text = c.stdout.decode(errors="replace")
    out = json.loads(text[text.index("{"):])
    return out["jobs"][0]["read"]["iops"]


def timed_shell(script, mnt=None, what=None):
    return run(["bash", "-c", script], mnt=mnt, what=what, quiet=True).elapsed


# ---------------------------------------------------------------------------------------------
# The cases

def curl_file(server, name, dest):
    url, extra = server_get(server, name)
    if os.path.exists(dest):
        os.unlink(dest)
    drop_caches()
    c = run(["curl", "-sSf", *extra, "-o", dest, url], what=f"curl from {SERVER_NAME[server]}")
    if os.path.getsize(dest) != SIZE:
        raise Fail(f"curl got {os.path.getsize(dest)} bytes")
    os.unlink(dest)
    return c


def round_servers(order):
    """Server check: one `curl -o /dev/null` of the SIZE file, file in the page cache."""
    cat(os.path.join(DATA, BIG), SIZE)
    for server in order:
        col = {"afs": "artifactfs", "nginx": "limit", "s3": "s3fs"}[server]

        def go(server=server):
            url, extra = server_get(server, BIG)
            return run(["curl", "-sSf", *extra, "-o", "/dev/null", url], what=f"curl from {SERVER_NAME[server]}").elapsed

        rec("server", col, go)


def round_curl_limits(order):
    dest = os.path.join(WORK, "curl-download.bin")
    for server in order:
        def go(server=server):
            c = curl_file(server, BIG, dest)
            if server == "nginx":
                put("cpu", "limit", c.cpu / (SIZE / GIB))
            return c.elapsed

        v = rec(f"curl_file:{server}", "limit", go)
        if server == "nginx" and v is not None:
            put("cold_read", "limit", v)

    def null():
        drop_caches()
        return run(["curl", "-sSf", "-o", "/dev/null", f"{SRV.nginx_url}/{BIG}"], what="curl").elapsed

    rec("curl_null", "limit", null)

    def ranged():
        drop_caches()
        piece = -(-SIZE // 8)
        kids = [Child(["curl", "-sSf", "-r", f"{i * piece}-{min(SIZE, (i + 1) * piece) - 1}", "-o", "/dev/null",
                       f"{SRV.nginx_url}/{BIG}"]) for i in range(8)]
        return span(kids, what="ranged curl")

    rec("curl_ranged8", "limit", ranged)
    for server in order:
        def first(server=server):
            url, extra = server_get(server, READERS[0])
            drop_caches()
            c = run(["curl", "-sSf", *extra, "-r", "0-65535", "-o", "/dev/null", "-w", "%{time_starttransfer}", url],
                    what="curl")
            return float(c.stdout.decode().strip().replace(",", "."))

        v = rec(f"ttfb_curl:{server}", "limit", first)
        if server == "nginx" and v is not None:
            put("ttfb", "limit", v)


def round_reads(tool):
    def first_byte(m):
        drop_caches()
        rec("ttfb", tool, lambda: ttfb(m.path(READERS[0]), m.mnt))

    with_mount(tool, ["ttfb"], first_byte)

    cases = ["cold_read", "cpu", "mem1_anon", "mem1_rss", "warm_first", "warm_kept", "warm_dropped", "fio1", "fio4"]
    keep = tool == "artifactfs"
    box = {}

    def reads(m):
        box["cache"] = m.cache
        drop_caches()
        sampler = Sampler(m.pid)
        try:
            cpu0 = proc_cpu(m.pid)
            t = rec("cold_read", tool, lambda: cat(m.path(BIG), SIZE, m.mnt))
            if t is not None:
                rec("cpu", tool, lambda: (proc_cpu(m.pid) - cpu0) / (SIZE / GIB))
        finally:
            anon, rss = sampler.stop()
        if t is None:
            for c in cases[1:]:
                fail(c, tool, "needs the cold read, which failed")
            return
        box["complete"] = True
        put("mem1_anon", tool, anon)
        put("mem1_rss", tool, rss)
        # The first re-read is recorded on its own: artifactfs's first passthrough open of the
        # file has the kernel drop the page cache the cold read left (0.12-0.2 s per GiB). The
        # re-read after it compares with the local file, which is read once before too.
        rec("warm_first", tool, lambda: cat(m.path(BIG), SIZE, m.mnt))
        rec("warm_kept", tool, lambda: cat(m.path(BIG), SIZE, m.mnt))
        # Page cache dropped: the tool and the local file (the limit) each after its own drop
        # and the same wait for the freed memory to settle (settled_drop), in turns.
        pair = [(tool, lambda: cat(m.path(BIG), SIZE, m.mnt)), ("limit", lambda: cat(os.path.join(DATA, BIG), SIZE))]
        for _ in range(DROPPED_PAIRS):
            DROPPED_TURN[0] += 1
            for col, fn in (pair if DROPPED_TURN[0] % 2 else pair[::-1]):
                settled_drop()
                t = rec("warm_dropped", col, fn)
                if col == "limit" and t is not None:
                    # The local reads paired with this tool's, for the paired ratio.
                    put(f"warm_dropped_local:{tool}", "limit", t)
        # fio reads a cached file, as it does the local one (round_local): read it again in
        # case the local read's drop came after the tool's read.
        with contextlib.suppress(Fail):
            cat(m.path(BIG), SIZE, m.mnt)
        rec("fio1", tool, lambda: fio(m.path(BIG), 1, m.mnt))
        rec("fio4", tool, lambda: fio(m.path(BIG), 4, m.mnt))
        if tool == "artifactfs":
            rec("passthrough_files", tool, lambda: passthrough_files(m))

    with_mount(tool, cases, reads, keep_cache=keep)
    if tool != "artifactfs" or "cache" not in box:
        return
    try:
        np_cases = ["warm_kept_np", "warm_dropped_np", "fio1_np", "fio4_np"]
        if not box.get("complete"):
            for c in np_cases:
                fail(c, tool, "needs the cold read, which failed")
            return

        def nopass(m):
            cat(m.path(BIG), SIZE, m.mnt)  # once, so that "kept" has the mount's page cache
            rec("warm_kept_np", tool, lambda: cat(m.path(BIG), SIZE, m.mnt))
            settled_drop()
            rec("warm_dropped_np", tool, lambda: cat(m.path(BIG), SIZE, m.mnt))
            rec("fio1_np", tool, lambda: fio(m.path(BIG), 1, m.mnt))
            rec("fio4_np", tool, lambda: fio(m.path(BIG), 4, m.mnt))

        with_mount(tool, np_cases, nopass, cache=box["cache"], passthrough=False)
    finally:
        shutil.rmtree(box["cache"], ignore_errors=True)


def passthrough_files(m):
    """How many open files the kernel reads directly (status), while the big file is open."""
    hold = Child([sys.executable, os.path.abspath(__file__), "--hold", m.path(BIG), "2"])
    time.sleep(1)
    st = json.loads(run([BIN, "status", m.mnt, "--json"], timeout=30, what="artifactfs status").stdout)
    hold.result(timeout=60, mnt=m.mnt, what="hold")
    return st.get("passthrough_files", 0) if st.get("passthrough") else 0


# Which side of the warm-dropped pair reads first (see round_reads).
DROPPED_TURN = [0]


def round_local():
    big = os.path.join(DATA, BIG)
    # The page-cache-dropped limit is read beside each tool's read (round_reads).
    cat(big, SIZE)
    rec("warm_kept", "limit", lambda: cat(big, SIZE))
    rec("fio1", "limit", lambda: fio(big, 1))
    rec("fio4", "limit", lambda: fio(big, 4))


def round_tree(tool):
    def ls(m):
        drop_caches()
        v = rec("ls_cold", tool, lambda: run(["ls", "-lR", m.path("tree")], mnt=m.mnt, quiet=True, what="ls -lR").elapsed)
        if v is None:
            if not m.dead:
                fail("ls_warm", tool, "needs the cold `ls -lR`, which failed or timed out")
            else:
                rec("ls_warm", tool, lambda: None)
            return
        rec("ls_warm", tool, lambda: run(["ls", "-lR", m.path("tree")], mnt=m.mnt, quiet=True, what="ls -lR").elapsed)

    with_mount(tool, ["ls_cold", "ls_warm"], ls)

    def small(m):
        drop_caches()
        rec("small_cold", tool, lambda: timed_shell(
            f"set -o pipefail; find {m.path('tree')} -type f -print0 | xargs -0 cat > /dev/null", m.mnt,
            "find | xargs cat"))

    with_mount(tool, ["small_cold"], small)


def round_tree_local():
    tree = os.path.join(DATA, "tree")
    drop_caches()
    rec("ls_cold", "limit", lambda: run(["ls", "-lR", tree], quiet=True, what="ls -lR").elapsed)
    rec("ls_warm", "limit", lambda: run(["ls", "-lR", tree], quiet=True, what="ls -lR").elapsed)
    drop_caches()
    rec("small_cold", "limit", lambda: timed_shell(f"find {tree} -type f -print0 | xargs -0 cat > /dev/null"))


def src_path():
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > SIZE + (256 << 20):
        return os.path.join(shm, "afs-bench-peers-src.bin")
    return os.path.join(WORK, "write-src.bin")


def fresh_src():
    """Fresh random content for every write (the same content twice would be deduplicated)."""
    random_file(src_path(), SIZE)


def settle_afs(name):
    subprocess.run(["curl", "-s", f"{SRV.afs_url}/{name}?afs=chunks", "-o", "/dev/null"], timeout=TIMEOUT)


def delete_remote(server, name):
    url, extra = server_get(server, name)
    subprocess.run(["curl", "-s", *extra, "-X", "DELETE", "-o", "/dev/null", url], timeout=120)


def round_write_limits(order, rnd):
    for server in order:
        name = f"w-curl-{server}-{rnd}.bin"

        def go(server=server, name=name):
            fresh_src()
            url, extra = server_get(server, name)
            drop_caches()
            return run(["curl", "-sSf", *extra, "-T", src_path(), "-o", "/dev/null", url], what="curl -T").elapsed

        v = rec(f"write_curl:{server}", "limit", go)
        if server == "afs" and v is not None:
            put("write", "limit", v)
        try:
            if server == "afs":
                settle_afs(name)
            delete_remote(server, name)
            if server != "s3":
                p = os.path.join(DATA, name)
                if os.path.exists(p):
                    os.unlink(p)
        except Exception as e:  # noqa: BLE001
            log(f"cleanup of {name}: {e}")


def round_write(tool, rnd):
    if tool == "httpdirfs":
        NA[("write", tool)] = "read-only"
        return
    name = f"w-{tool}-{rnd}.bin"

    def write(m):
        fresh_src()
        dest = server_path(tool, name)
        drop_caches()

        def go():
            c = run(["cp", src_path(), m.path(name)], mnt=m.mnt, what="cp")
            end = time.time() + TIMEOUT
            while not (os.path.exists(dest) and os.path.getsize(dest) == SIZE):
                if time.time() > end:
                    raise Fail(f"the file did not reach the server within {TIMEOUT:.0f} s after cp", timeout=True)
                time.sleep(0.01)
            on_server = time.perf_counter() - c.t0
            put("write_cp", tool, c.elapsed)
            return max(on_server, c.elapsed)

        rec("write", tool, go)
        if tool == "artifactfs":
            settle_afs(name)
        try:
            run(["rm", "-f", m.path(name)], mnt=m.mnt, timeout=120, what="rm")
        except Fail as e:
            log(f"rm through {tool}: {e}")

    with_mount(tool, ["write"], write)
    p = server_path(tool, name) if (tool != "s3fs" or SRV.s3) else None
    if p and os.path.exists(p):
        os.unlink(p)


def round_four_limit():
    """The 4-readers limit: four `curl -o FILE`s of the readers' files from artifactfs serve at
    once, cold. It takes its turn among the tools (see main)."""
    dests = [os.path.join(WORK, f"curl-four-{i}.bin") for i in range(len(READERS))]

    def go():
        drop_caches()
        curls = []
        for r, dest in zip(READERS, dests):
            url, extra = server_get("afs", r)
            curls.append(Child(["curl", "-sSf", *extra, "-o", dest, url]))
        t = span(curls, what="curl -o FILE")
        for dest in dests:
            if os.path.getsize(dest) != FOUR:
                raise Fail(f"curl got {os.path.getsize(dest)} bytes")
        return t

    try:
        rec("four_read", "limit", go)
    finally:
        for dest in dests:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)


def round_mem(tool):
    def four(m):
        drop_caches()
        sampler = Sampler(m.pid)
        try:
            kids = [Child([sys.executable, os.path.abspath(__file__), "--cat", m.path(r)]) for r in READERS]
            t = span(kids, mnt=m.mnt, what="reader")
            if any(json.loads(k.stdout)["bytes"] != FOUR for k in kids):
                raise Fail("short read")
        finally:
            anon, rss = sampler.stop()
        put("four_read", tool, t)
        put("mem4_anon", tool, anon)
        put("mem4_rss", tool, rss)

    with_mount(tool, ["four_read", "mem4_anon", "mem4_rss"], four)


def calibrate_httpdirfs():
    """httpdirfs with and without its cache: one cold read of the first CAL bytes of the big file
    each (without its cache httpdirfs makes one request per kernel read, each ~0.1 s: a whole
    GiB would take ~15 min), the faster one is used in the rounds."""
    global HTTPDIRFS_CACHE
    got = {}
    for variant in (True, False):
        HTTPDIRFS_CACHE = variant
        key = "with --cache" if variant else "without cache"

        def go(m, key=key):
            drop_caches()
            got[key] = CAL / cat(m.path(BIG), CAL, m.mnt, limit=CAL) / (1 << 20)

        try:
            m = mount("httpdirfs")
            try:
                go(m)
            finally:
                unmount(m)
        except Fail as e:
            got[key] = f"failed: {e}"
        log(f"httpdirfs calibration, {key}: {got[key]}")
    speeds = {k: v for k, v in got.items() if isinstance(v, float)}
    HTTPDIRFS_CACHE = (not speeds) or max(speeds, key=speeds.get) == "with --cache"
    return {"cold_read_mib_s": got, "bytes": CAL, "chosen": "with --cache" if HTTPDIRFS_CACHE else "without cache"}


def prime():
    """The built-in server hashes each file once (kept in its state dir): done before the rounds,
    as on a server that has been up. Also a first mount, so nothing measured is a first start."""
    for name in [BIG] + READERS:
        run(["curl", "-sSfI", f"{SRV.afs_url}/{name}"], timeout=TIMEOUT, quiet=True, what="curl -I")
    m = mount("artifactfs")
    try:
        run(["bash", "-c", f"find {m.path('tree')} -type f -print0 | xargs -0 cat > /dev/null"], mnt=m.mnt, quiet=True,
            what="priming the tree")
    finally:
        unmount(m)


# ---------------------------------------------------------------------------------------------
# Report

def med(case, col):
    v = R.get(case, {}).get(col)
    return statistics.median(v) if v else None


def gibs(nbytes, t):
    return nbytes / GIB / t


def fmt_speed(x):
    return f"{x:.2f} GiB/s" if x >= 0.1 else f"{x * 1024:.0f} MiB/s"


def fmt_ratio(r):
    return f"{r:.2f}×"


def esc(s):
    return s.replace("|", "\\|").replace("\n", " ")


def failure_text(case, col):
    if (case, col) in NA:
        return f"n/a ({NA[(case, col)]})"
    reasons = FAILS.get(case, {}).get(col)
    if not reasons:
        return None
    first = reasons[0]
    return esc(f"FAIL: {first[:100]}" + (f" ({len(reasons)} rounds)" if len(reasons) > 1 else ""))


def cell(case, col, show, ratio=None, target=None):
    """show(median) -> text; ratio(median) -> float or None; target(ratio or value) -> bool."""
    na = failure_text(case, col) if (case, col) in NA else None
    if na:
        return na
    m = med(case, col)
    if m is None:
        return failure_text(case, col) or "—"
    text = show(m)
    r = ratio(m) if ratio else None
    if r is not None:
        text += f" ({fmt_ratio(r)})"
    if target is not None and col == "artifactfs":
        ok = target(r if r is not None else m)
        text += " ✓" if ok else " ✗"
    n_fail = len(FAILS.get(case, {}).get(col, []))
    if n_fail:
        text += esc(f" [{n_fail} round(s) failed: {FAILS[case][col][0][:80]}]")
    return text


def table():
    scale = FILES / 10000
    rows = []
    sz = f"{SIZE_MIB} MiB"

    def row(label, cells):
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    def speed_row(case, label, nbytes, limit_case=None, target=None, ratio_to=None):
        lim = med(limit_case or case, "limit")
        cells = []
        for col in COLS:
            ref = ratio_to(col) if ratio_to else lim
            cells.append(cell(case, col, lambda t: fmt_speed(gibs(nbytes, t)),
                              (lambda t, ref=ref: ref / t if ref else None) if col != "limit" or ratio_to else None,
                              target))
        row(label, cells)

    # server check
    nginx = med("server", "limit")
    row(f"server: one `curl -o /dev/null` of {sz} (file in page cache); limit = nginx",
        [cell("server", "limit", lambda t: fmt_speed(gibs(SIZE, t))),
         cell("server", "artifactfs", lambda t: "artifactfs serve " + fmt_speed(gibs(SIZE, t)),
              lambda t: nginx / t if nginx else None, lambda r: r >= 0.8),
         "(nginx = limit)", "(nginx = limit)",
         cell("server", "s3fs", lambda t: "s3s-fs " + fmt_speed(gibs(SIZE, t)), lambda t: nginx / t if nginx else None)])
    # cold read
    speed_row("cold_read", f"cold sequential read of {sz} (1 MiB reads); limit = `curl -o FILE` from nginx", SIZE)
    own = {col: med(f"curl_file:{OWN_SERVER[col]}", "limit") for col in TOOLS}
    lim_txt = ", ".join(f"{SERVER_NAME[s]} {fmt_speed(gibs(SIZE, med(f'curl_file:{s}', 'limit')))}"
                        for s in ("afs", "nginx", "s3") if med(f"curl_file:{s}", "limit"))
    # Issue 6's target (issue 2 asked for 0.8× of the same).
    row("cold read ÷ `curl -o FILE` from the tool's own server (target ≥ 0.95×)",
        [lim_txt or failure_text("curl_file:nginx", "limit") or "—"]
        + [cell("cold_read", col, lambda t: "", (lambda t, col=col: own[col] / t if own[col] else None),
                (lambda r: r >= 0.95)).strip() for col in TOOLS])
    for case, label in [("curl_null", "`curl -o /dev/null` from nginx"),
                        ("curl_ranged8", "8 parallel ranged `curl -r` from nginx to /dev/null")]:
        ref = med(case, "limit")
        row(f"cold read ÷ {label}",
            [cell(case, "limit", lambda t: fmt_speed(gibs(SIZE, t)))]
            + [cell("cold_read", col, lambda t: "", (lambda t, ref=ref: ref / t if ref else None)).strip()
               for col in TOOLS])
    # warm
    speed_row("warm_kept", "warm read (complete in the tool's cache), page cache kept, second re-read; "
              "limit = local file (target ≥ 0.9×)", SIZE, target=lambda r: r >= 0.9)
    speed_row("warm_first", "first re-read right after the cold read, page cache kept; limit = local file", SIZE,
              limit_case="warm_kept")
    speed_row("warm_dropped", "warm read, page cache dropped; limit = local file (target ≥ 0.9×)", SIZE,
              target=lambda r: r >= 0.9)
    paired = {col: med(f"warm_dropped_local:{col}", "limit") for col in TOOLS}
    if any(paired.values()):
        row("warm read, page cache dropped ÷ the local reads paired with the tool's (same turns)",
            ["—"] + [cell("warm_dropped", col, lambda t: "", (lambda t, col=col: paired[col] / t if paired[col] else None)).strip()
                     for col in TOOLS])
    for case, label, ref in [("warm_kept_np", "warm read, page cache kept, artifactfs `--passthrough=false`",
                              "warm_kept"),
                             ("warm_dropped_np", "warm read, page cache dropped, artifactfs `--passthrough=false`",
                              "warm_dropped")]:
        lim = med(ref, "limit")
        row(label, [cell(ref, "limit", lambda t: fmt_speed(gibs(SIZE, t))),
                    cell(case, "artifactfs", lambda t: fmt_speed(gibs(SIZE, t)), lambda t, lim=lim: lim / t if lim else None),
                    "—", "—", "—"])
    # fio
    for case, label, ref in [("fio1", "fio 4 KiB random reads, 1 job (IOPS); limit = local file (target ≥ 0.8×)", "fio1"),
                             ("fio4", "fio 4 KiB random reads, 4 jobs (IOPS) (target ≥ 0.8×)", "fio4"),
                             ("fio1_np", "fio 1 job, artifactfs `--passthrough=false`", "fio1"),
                             ("fio4_np", "fio 4 jobs, artifactfs `--passthrough=false`", "fio4")]:
        lim = med(ref, "limit")
        cols = COLS if case == ref else ["limit", "artifactfs"]
        cells = []
        for col in COLS:
            if col not in cols:
                cells.append("—")
                continue
            c = ref if col == "limit" else case
            cells.append(cell(c, col, lambda v: f"{v / 1000:.1f}k",
                              None if col == "limit" else (lambda v, lim=lim: v / lim if lim else None),
                              (lambda r: r >= 0.8) if case == ref else None))
        row(label, cells)
    # tree
    for case, label, target in [
        ("ls_cold", f"`ls -lR` of {FILES} files in 100 folders, cold (target ≤ {0.5 * scale:.2f} s)",
         lambda v: v <= 0.5 * scale),
        ("ls_warm", "`ls -lR`, warm (target within 2× local)", None),
        ("small_cold", f"read every small file cold, `find \\| xargs cat` (target ≤ {2.5 * scale:.2f} s)",
         lambda v: v <= 2.5 * scale),
    ]:
        lim = med(case, "limit")
        cells = []
        for col in COLS:
            r = None if col == "limit" else (lambda v, lim=lim: lim / v if lim else None)
            t = target
            if case == "ls_warm":
                t = (lambda rr: rr >= 0.5)
            if case != "ls_warm" and col == "artifactfs":
                # the target is on the time; show the ratio too
                m = med(case, col)
                text = cell(case, col, lambda v: f"{v:.3f} s", r)
                if m is not None:
                    text += " ✓" if target(m) else " ✗"
                cells.append(text)
                continue
            cells.append(cell(case, col, lambda v: f"{v:.3f} s", r, t))
        row(label, cells)
    # writes
    speed_row("write", f"sequential write of a new {sz} (`cp`, close included, until on the server); "
              "limit = `curl -T` to artifactfs serve", SIZE)
    ownw = {col: med(f"write_curl:{OWN_SERVER[col]}", "limit") for col in TOOLS}
    lim_txt = ", ".join(f"{SERVER_NAME[s]} {fmt_speed(gibs(SIZE, med(f'write_curl:{s}', 'limit')))}"
                        for s in ("afs", "nginx", "s3") if med(f"write_curl:{s}", "limit"))
    row("write ÷ `curl -T` to the tool's own server (target ≥ 0.8×)",
        [lim_txt or "—"] + [cell("write", col, lambda t: "", (lambda t, col=col: ownw[col] / t if ownw[col] else None),
                                 lambda r: r >= 0.8).strip() for col in TOOLS])
    row("write: time until `cp` returned", ["—"] + [cell("write_cp", col, lambda t: f"{t:.3f} s")
                                                     if ("write", col) not in NA else failure_text("write", col)
                                                     for col in TOOLS])
    # memory
    speed_row("four_read", f"4 readers, 4 different {FOUR_MIB} MiB files at once, cold: aggregate; "
              "limit = four `curl -o FILE` from artifactfs serve at once", 4 * FOUR)
    row("daemon peak RssAnon, 4 readers (target ≤ 96 MiB)",
        ["—"] + [cell("mem4_anon", col, lambda v: f"{v / 2**20:.0f} MiB", None,
                      (lambda v: v <= 96 * 2**20)) for col in TOOLS])
    row("daemon peak VmRSS, 4 readers", ["—"] + [cell("mem4_rss", col, lambda v: f"{v / 2**20:.0f} MiB") for col in TOOLS])
    row("daemon peak RssAnon / VmRSS, one cold read",
        ["—"] + [(f"{med('mem1_anon', col) / 2**20:.0f} / {med('mem1_rss', col) / 2**20:.0f} MiB"
                  if med("mem1_anon", col) is not None else (failure_text("cold_read", col) or "—")) for col in TOOLS])
    row("CPU seconds per GiB read cold (daemon utime+stime; limit = curl -o FILE)",
        [cell("cpu", col, lambda v: f"{v:.2f} s") for col in COLS])
    ownt = {col: med(f"ttfb_curl:{OWN_SERVER[col]}", "limit") for col in TOOLS}
    row("first byte of a cold artifact (open + read 1 byte); limit = curl `time_starttransfer` from nginx; "
        "ratio to curl from the tool's own server",
        [cell("ttfb", "limit", lambda v: f"{v * 1000:.1f} ms")]
        + [cell("ttfb", col, lambda v: f"{v * 1000:.1f} ms", (lambda v, col=col: ownt[col] / v if ownt[col] else None))
           for col in TOOLS])
    head = ["| case | " + " | ".join(COLS) + " |", "|---|" + "---|" * len(COLS)]
    return "\n".join(head + rows)


def machine():
    def first(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "not available"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    df = subprocess.run(["df", "-T", WORK], capture_output=True, text=True).stdout.strip().splitlines()[-1].split()
    dev = os.path.basename(df[0])
    base = dev.rstrip("0123456789") if not dev.startswith("nvme") else dev.split("p")[0]
    rot = "?"
    try:
        with open(f"/sys/block/{base}/queue/rotational") as f:
            rot = "rotational" if f.read().strip() == "1" else "non-rotational"
    except OSError:
        pass
    s3s = "?"
    try:
        with open(os.path.join(ROOT, "Cargo.lock")) as f:
            lock = f.read()
        i = lock.index('name = "s3s-fs"')
        s3s = lock[i:].splitlines()[1].split('"')[1]
    except (OSError, ValueError, IndexError):
        pass
    git = first(["git", "-C", ROOT, "log", "-1", "--format=%h %s"])
    git = git if len(git) <= 90 else git[:87] + "..."
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / GIB, 1), "kernel": os.uname().release,
        "disk": f"{df[0]} ({df[1]}, {rot}), {int(df[2]) // (1 << 20)} GiB",
        "fuse_max_pages_limit": first(["cat", "/proc/sys/fs/fuse/max_pages_limit"]),
        "versions": {
            "artifactfs": first([BIN, "--version"]), "rclone": first(["rclone", "version"]),
            "httpdirfs": httpdirfs_version(), "s3fs": first(["s3fs", "--version"]),
            "nginx": first(["nginx", "-v"]), "curl": " ".join(first(["curl", "--version"]).split()[:2]), "fio": first(["fio", "--version"]),
            "s3s-fs": s3s, "python": sys.version.split()[0],
        },
        "commit": git + (" (with uncommitted changes)" if dirty else ""),
        "date": datetime.date.today().isoformat(),
    }


def httpdirfs_version():
    try:
        out = subprocess.run(["httpdirfs", "--version"], capture_output=True, text=True, timeout=30)
        return next(line for line in (out.stdout + out.stderr).splitlines() if "HTTPDirFS" in line).strip()
    except Exception:  # noqa: BLE001
        return "not available"


def chart(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("cold read", "cold_read", SIZE), ("warm,\npage cache kept", "warm_kept", SIZE),
              ("warm,\npage cache dropped", "warm_dropped", SIZE), ("write\n(until on server)", "write", SIZE),
              ("4 readers,\naggregate", "four_read", 4 * FOUR)]
    colors = {"limit": "#888888", "artifactfs": "#1f77b4", "rclone": "#ff7f0e", "httpdirfs": "#2ca02c",
              "s3fs": "#d62728"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [5, 2, 3]})
    w = 0.16

    def bars(ax, labels, value, unit, log=True):
        for i, col in enumerate(COLS):
            for j, (lab, case) in enumerate(labels):
                v = value(case, col)
                x = j + (i - 2) * w
                if v is None:
                    if (case, col) in NA:
                        text = "n/a"
                    elif FAILS.get(case, {}).get(col):
                        text = "fail"
                    else:
                        continue
                    ax.text(x, 0.02, text, ha="center", va="bottom", rotation=90, fontsize=7,
                            transform=ax.get_xaxis_transform(), color=colors[col])
                    continue
                ax.bar(x, v, w, color=colors[col])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([lab for lab, _ in labels], fontsize=8)
        ax.set_ylabel(unit)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)

    def speed(case, col):
        m = med(case, col)
        size = dict((c, s) for _, c, s in groups).get(case, SIZE)
        return gibs(size, m) if m else None

    bars(axes[0], [(g, c) for g, c, _ in groups], speed, "GiB/s (higher is better)")
    axes[0].set_title(f"Throughput, {SIZE_MIB} MiB files")
    bars(axes[1], [("1 job", "fio1"), ("4 jobs", "fio4")], lambda c, col: med(c, col), "IOPS (higher is better)",
         log=False)
    axes[1].set_title("4 KiB random reads (fio), cached file")
    bars(axes[2], [("ls -lR\ncold", "ls_cold"), ("ls -lR\nwarm", "ls_warm"), ("cat every\nfile, cold", "small_cold")],
         lambda c, col: med(c, col), "seconds (lower is better)")
    axes[2].set_title(f"{FILES} files of 4 KiB")
    from matplotlib.patches import Patch
    fig.legend([Patch(color=colors[c]) for c in COLS], COLS, loc="upper center", ncol=5, frameon=False,
               bbox_to_anchor=(0.5, 0.95))
    fig.suptitle(f"artifactfs beside its peers — median of {ROUNDS} interleaved rounds, one run", y=0.99, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def rounds_note():
    """artifactfs's rounds beside the limit's, in seconds, for the main read cases."""
    def fmt(case, col):
        v = R.get(case, {}).get(col)
        return ", ".join(f"{x:.3f}" for x in v) if v else "—"

    lines = []
    for case, label, lim, lim_label in [
        ("cold_read", "cold read", "curl_file:afs", "`curl -o FILE` from artifactfs serve"),
        ("warm_kept", "warm, page cache kept (second re-read)", "warm_kept", "the limit"),
        ("warm_first", "first re-read", None, None),
        ("warm_dropped", "warm, page cache dropped", "warm_dropped_local:artifactfs", "the local file in the same turns"),
        ("small_cold", "small files", "small_cold", "the limit"),
        ("four_read", "four readers (4 files)", "four_read", "the limit"),
    ]:
        text = f"{label}: {fmt(case, 'artifactfs')}"
        if lim:
            text += f"; {lim_label}: {fmt(lim, 'limit')}"
        lines.append(text)
    return "artifactfs's rounds, in seconds: " + "; ".join(lines) + "."


def report(info, calib, elapsed, save_json=True):
    t = table()
    notes = [
        f"Median of {ROUNDS} interleaved rounds in one run; {SIZE_MIB} MiB file, {FILES} files of 4 KiB, "
        f"4 × {FOUR_MIB} MiB for the 4 readers. Ratios are speed ratios against the column's reference "
        "(above 1× the tool is faster); ✓/✗ mark artifactfs's targets.",
        "Cold = a fresh mount with an empty cache directory and the page cache dropped (also the servers').",
        f"Warm, page cache dropped: {DROPPED_PAIRS} pairs per tool and round; each tool's read and a read of "
        f"the local file each follow a drop and a {SETTLE:g} s wait for the freed memory to settle (see "
        "settled_drop), in turns (which goes first alternates); the limit is the median of those local reads.",
        f"httpdirfs {calib['chosen']} (calibration, cold read of the first {calib['bytes'] >> 20} MiB: "
        + ", ".join(f"{k} {v:.0f} MiB/s" if isinstance(v, float) else f"{k} {v}"
                    for k, v in calib["cold_read_mib_s"].items())
        + "); `--no-range-check` (1.2.5 finds nginx lacks ranges without it).",
        "rclone `mount :webdav: --vfs-cache-mode full` (other flags default: it uploads a closed file after "
        "`--vfs-write-back` 5 s, hence its write is timed until the file is complete on nginx; `cp` alone in "
        "the next row). s3fs with `use_cache` (its local cache), over s3s-fs "
        f"{info['versions']['s3s-fs']} (GETs in 4 KiB pieces: see the server row).",
        "Memory: peak of the daemon process sampled every 100 ms; VmRSS includes file-backed pages of mapped cache "
        "files. fio: `--ioengine=psync --rw=randread --bs=4k --randrepeat=0 --direct=0 --invalidate=0 "
        f"--time_based --runtime={FIO_RUNTIME} --group_reporting` over the file after the warm reads "
        "(`--invalidate=0`: fio's default drops the file's page cache first, which empties a local file's "
        "cache but not a passthrough file's backing cache).",
    ]
    if R.get("passthrough_files", {}).get("artifactfs"):
        pt = R["passthrough_files"]["artifactfs"]
        notes.append(f"artifactfs passthrough: the big file was read by the kernel directly in {sum(1 for v in pt if v)} "
                     f"of {len(pt)} rounds (status `passthrough_files` while open).")
    notes.append(rounds_note())
    text = t + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "peers.md"), "w") as f:
        f.write(text)
    if save_json:
        with open(os.path.join(OUT_DIR, "peers.json"), "w") as f:
            json.dump({
                "config": {"size_mib": SIZE_MIB, "four_mib": FOUR_MIB, "files": FILES, "rounds": ROUNDS,
                           "fio_runtime": FIO_RUNTIME, "case_timeout": TIMEOUT, "settle_s": SETTLE,
                           "dropped_pairs": DROPPED_PAIRS},
                "machine": info, "httpdirfs_calibration": calib, "elapsed_s": round(elapsed, 1),
                "units": "seconds for times (cold_read, warm_*, write*, ls_*, small_cold, four_read, ttfb, curl*, "
                         "server), IOPS for fio*, bytes for mem*, CPU seconds per GiB for cpu",
                "rounds": R,
                "medians": {c: {col: statistics.median(v) for col, v in d.items() if v} for c, d in R.items()},
                "failures": FAILS, "not_applicable": {f"{c}/{col}": r for (c, col), r in NA.items()},
            }, f, indent=1)
    chart_msg = ""
    try:
        chart(CHART)
        chart_msg = f"chart: {CHART}"
    except Exception as e:  # noqa: BLE001
        chart_msg = f"chart failed: {type(e).__name__}: {e}"
    v = info["versions"]
    paste = f"""
---8<--- section for docs/BENCHMARKS.md ---8<---
## Beside the peers (issue 6)

```
sudo scripts/bench/run.sh   # BENCH_SIZE_MIB={SIZE_MIB} BENCH_FILES={FILES} BENCH_ROUNDS={ROUNDS}
```

Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, Linux {info['kernel']},
{info['disk']} (cache, data and servers on it); fuse max_pages_limit {info['fuse_max_pages_limit']}.
Tools: {v['artifactfs']}; {v['rclone']}; {v['httpdirfs']}; {v['s3fs']}; {v['nginx']}; s3s-fs {v['s3s-fs']};
{v['curl']}; {v['fio']}. Commit {info['commit']}, run on {info['date']} ({elapsed / 60:.0f} min).

{text}
![throughput by tool and case](bench-peers.png)
---8<---
"""
    print(paste)
    print(f"wrote {OUT_DIR}/peers.md" + (f", {OUT_DIR}/peers.json" if save_json else "") + f"; {chart_msg}")


# ---------------------------------------------------------------------------------------------

def preflight():
    if os.geteuid() != 0:
        raise SystemExit("run as root (page cache drops and mounts need it)")
    if not os.path.exists("/dev/fuse"):
        raise SystemExit("no /dev/fuse")
    if not os.path.exists(BIN_SRC):
        raise SystemExit(f"{BIN_SRC} missing: build it first (cargo build --release)")
    for tool in ("curl", "nginx", "fio"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (scripts/bench/run.sh installs it)")
    os.makedirs(WORK, exist_ok=True)
    have = 0
    for name, size in [(BIG, SIZE)] + [(r, FOUR) for r in READERS]:
        p = os.path.join(DATA, name)
        if os.path.exists(p) and os.path.getsize(p) == size:
            have += size
    data = SIZE + 4 * FOUR + FILES * 8192
    # data + the largest cache at once (4 readers: 4 × FOUR, or SIZE twice for the passthrough-off
    # remount) + curl's download + a written file on the server + margin
    need = data - have + max(4 * FOUR, SIZE) + 2 * SIZE + (2 << 30)
    free = shutil.disk_usage(WORK).free
    if free < need:
        raise SystemExit(f"not enough room under {WORK}: {free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed "
                         f"(data {data / GIB:.1f} GiB + caches + downloads); set BENCH_DIR or smaller BENCH_SIZE_MIB")
    log(f"disk: {free / GIB:.1f} GiB free under {WORK}, {need / GIB:.1f} GiB needed")


def cleanup_stale():
    """Mounts left under BENCH_DIR by an earlier run that was killed."""
    for fields in mountinfo():
        if fields[4].startswith(WORK + "/"):
            log(f"unmounting a stale mount {fields[4]}")
            abort_mount(fields[4])


def cleanup():
    for mnt in sorted(MOUNTS):
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        if is_mounted(mnt):
            abort_mount(mnt)
    s3 = SRV.s3
    if s3 and s3.get("proc") and s3["proc"].poll() is None:
        try:
            s3["proc"].stdin.close()  # bench_servers stops nginx and s3s-fs when its stdin closes
            s3["proc"].wait(timeout=30)
        except Exception:  # noqa: BLE001
            pass
    for p in reversed(STARTED):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)
    # an nginx the S3 helper started, if the helper died before stopping it
    for pidfile in glob.glob(os.path.join(WORK, "s3tmp", "afs-web-*", "nginx.pid")):
        try:
            pid = int(open(pidfile).read().strip())
            if pid_alive(pid) and "nginx" in open(f"/proc/{pid}/cmdline").read():
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
    left = [f[4] for f in mountinfo() if f[4].startswith(WORK + "/")]
    if left:
        log(f"WARNING: still mounted: {left}")
    src = src_path()
    if os.path.exists(src):
        os.unlink(src)
    if not KEEP:
        shutil.rmtree(WORK, ignore_errors=True)
    else:
        shutil.rmtree(os.path.join(WORK, "caches"), ignore_errors=True)
        log(f"kept {WORK} (BENCH_KEEP=1)")


def main():
    preflight()
    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.time()
    try:
        cleanup_stale()
        for d in ("bin", "logs", "mnt", "caches"):
            os.makedirs(os.path.join(WORK, d), exist_ok=True)
        shutil.copy2(BIN_SRC, BIN)
        make_data()
        md5 = etags()
        start_afs()
        start_nginx()
        try:
            start_s3(md5)
        except Fail as e:
            SRV.s3_error = str(e)
            log(f"S3 server: {e}")
        log(f"servers: artifactfs {SRV.afs_url}, nginx {SRV.nginx_url}, s3 {SRV.s3['endpoint'] if SRV.s3 else SRV.s3_error}")
        prime()
        info = machine()
        calib = calibrate_httpdirfs()
        servers = ["afs", "nginx", "s3"] if SRV.s3 else ["afs", "nginx"]
        if not SRV.s3:
            for case in ("server",):
                fail(case, "s3fs", f"no S3 server: {SRV.s3_error}")
        for rnd in range(ROUNDS):
            k = rnd % len(TOOLS)
            order = TOOLS[k:] + TOOLS[:k]
            sorder = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
            log(f"round {rnd + 1}/{ROUNDS}, order {order}")
            round_servers(sorder)
            round_curl_limits(sorder)
            for tool in order:
                log(f"  reads: {tool}")
                round_reads(tool)
            round_local()
            for tool in order:
                log(f"  tree: {tool}")
                round_tree(tool)
            round_tree_local()
            log("  writes")
            round_write_limits(sorder, rnd)
            for tool in order:
                round_write(tool, rnd)
            # The limit takes a turn among the tools: on this kind of VM the first 4-readers case
            # after the writes took 2-3 times as long as in other rounds (memory freed seconds
            # before has gone back to the host, see settled_drop; each later case follows the
            # drop of gigabytes just freed by the one before). With 5 columns over 5 rounds each
            # is first once, and the median leaves that round out.
            cols = ["limit"] + TOOLS
            k5 = rnd % len(cols)
            for col in cols[k5:] + cols[:k5]:
                log(f"  4 readers: {'four curl -o FILE' if col == 'limit' else col}")
                if col == "limit":
                    round_four_limit()
                else:
                    round_mem(col)
            summary = {c: {col: round(v[-1], 3) for col, v in d.items() if v} for c, d in R.items()
                       if c in ("cold_read", "warm_kept", "ls_cold", "small_cold", "write", "four_read")}
            log(f"round {rnd + 1} done ({(time.time() - started) / 60:.1f} min): {json.dumps(summary)}")
        report(info, calib, time.time() - started)
    finally:
        cleanup()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--cat", "--ttfb", "--hold"):
        sys.exit(child_mode(sys.argv))
    if SAVED is not None:
        R.update(SAVED["rounds"])
        FAILS.update(SAVED["failures"])
        NA.update({tuple(k.split("/", 1)): v for k, v in SAVED["not_applicable"].items()})
        report(SAVED["machine"], SAVED["httpdirfs_calibration"], SAVED["elapsed_s"], save_json=False)
        sys.exit(0)
    main()
