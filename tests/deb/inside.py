"""`make test-deb`, inside the bookworm chroot, as the user lightningd would run as.

Replays a real recording through the INSTALLED plugin (/usr/lib/pibackup/pibackup.py, run
through its own #! line, as lightningd runs it) with the test driver, restores with the
installed /usr/bin/pibackup, and compares the result with the driver's live database and
with the real lightningd database recorded with the trace. Prints the plugin's memory.

Usage: python3 inside.py BACKUP_DIR TRACE_NAME   (PIBACKUP_TRACES names the recordings' folder)
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dbcompare  # noqa: E402
import driver  # noqa: E402

PLUGIN = Path("/usr/lib/pibackup/pibackup.py")
COMMAND = "/usr/bin/pibackup"


def proc_status(pid: int) -> Dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def extension_modules(pid: int) -> List[str]:
    """Compiled modules the plugin has loaded (from its memory map)."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if ".cpython-" in path or "/lib-dynload/" in path or "site-packages" in path or "dist-packages" in path:
            names.add(Path(path).name.split(".")[0])
    return sorted(names)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600)


def main() -> int:
    dest, trace = Path(sys.argv[1]), sys.argv[2]
    records = driver.load_trace(trace)
    work = Path.home() / "test-deb"
    node = driver.Node(work / "node", {"pibackup-destination": str(dest), "pibackup-allow-same-medium": "true"})
    node.plugin_path = PLUGIN
    node.plugin_python = None  # exec the file: its #! line is the installed one
    # systemd's notify socket, as lightningd.service with the drop-in gives it: the STATUS
    # line goes out through Debian's python3-sdnotify.
    notify_path = str(work / "notify.sock")
    work.mkdir(parents=True, exist_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(0)
    node.plugin_env = {"NOTIFY_SOCKET": notify_path}

    samples: List[Dict[str, str]] = []
    loaded: List[str] = []

    def before_stop(n: driver.Node) -> None:
        status = n.rpc("pibackup-status")
        assert status["state"] == "ok", status
        assert n.plugin is not None
        samples.append(proc_status(n.plugin.proc.pid))
        loaded[:] = extension_modules(n.plugin.proc.pid)

    t0 = time.monotonic()
    driver.run_sessions(node, records, before_stop=before_stop)
    replay_s = time.monotonic() - t0
    assert node.live.version() == records[-1].data_version, (node.live.version(), records[-1].data_version)
    errors = [m for lvl, m in node.all_logs if lvl == "error"]
    assert not errors, errors
    sessions = len(samples)
    print(f"ok: replayed {trace} ({len(records)} db_write calls, {sessions} lightningd sessions) through {PLUGIN} in {replay_s:.1f} s")

    statuses = []
    while True:
        try:
            statuses.append(notify.recv(4096).decode())
        except BlockingIOError:
            break
    ok_lines = [m for m in statuses if m.startswith("STATUS=pibackup: ok")]
    assert ok_lines, statuses
    print(f"ok: systemd STATUS line through python3-sdnotify: {ok_lines[-1]!r}")

    hwm = max(int(s["VmHWM"].split()[0]) for s in samples)
    rss = max(int(s["VmRSS"].split()[0]) for s in samples)
    print(f"installed plugin memory: peak RSS (VmHWM) {hwm / 1024:.1f} MiB, RSS at the end of a session {rss / 1024:.1f} MiB")
    print(f"compiled modules loaded by the plugin: {', '.join(loaded) or 'none'}")
    heavy = [m for m in loaded if m.startswith(("_libsecp256k1", "tibs"))]
    assert not heavy, f"the plugin loaded pyln-proto's compiled dependencies (coincurve, bitstring), which it does not need: {heavy}"

    out = work / "restored.sqlite3"
    r = run(COMMAND, "restore", str(dest), str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--rescan=-" in r.stdout + r.stderr, "a filtered restore says how to rebuild utxoset"
    assert dbcompare.backup_differences(node.live.path, out) == []
    real = driver.TRACES / f"{trace}.sqlite3"
    assert dbcompare.backup_differences(real, out) == []
    print(f"ok: {COMMAND} restore: equal to the driver's live database and to the real {real.name} (utxoset rows filtered)")

    v = run(COMMAND, "verify", str(dest))
    assert v.returncode == 0, v.stdout + v.stderr
    s = run(COMMAND, "status", str(dest))
    assert s.returncode == 0, s.stdout + s.stderr
    print(f"ok: {COMMAND} verify and status")

    # Shipping's encryption, with bookworm's python3-cryptography: a key from the installed
    # command, and a journal segment encrypted and decrypted by the installed module.
    key_file = work / "ship.key"
    k = run(COMMAND, "keygen", str(key_file))
    assert k.returncode == 0 and key_file.stat().st_mode & 0o077 == 0, k.stdout + k.stderr
    sys.path.insert(0, "/usr/lib/pibackup")
    import cryptography

    from pibackup.copies import crypt

    seg = sorted(dest.glob("gen-*/seg-*.pbj"))[0]
    rel = str(seg.relative_to(dest))
    key = crypt.load_key(str(key_file))
    enc = crypt.Encryptor(key, rel)
    sealed = work / "seg.enc"
    sealed.write_bytes(enc.header + enc.chunks(seg.read_bytes(), final=True))
    plain = io.BytesIO()
    assert crypt.decrypt_file(str(sealed), plain, key, rel).final
    assert plain.getvalue() == seg.read_bytes()
    print(f"ok: {COMMAND} keygen; {rel} encrypted and decrypted by the installed module with cryptography {cryptography.__version__}")
    node.live.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
