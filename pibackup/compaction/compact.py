"""Compaction: the next generation's snapshot built from the previous snapshot plus its
journal (never from the live DB), in a child process, then an atomic switch; and retention.

The child (`build_snapshot`) replays the journal up to where it ended at the cut (appends
never change those bytes), then follows what the writer makes durable after it until it is
close behind. The compactor thread in the plugin copies the frames written after the
child's end into the new generation and switches under the writer's lock. Steps, and what
a crash at each leaves, are in FORMAT.md ("Compaction").
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from pibackup.compaction.messages import At, Built, Done, Failed, Job, More, Nothing, Start, decode_reply, decode_result
from pibackup.errors import PibackupError
from pibackup.modes.journal.port import CompactionError, CompactionPort, Finished, GenerationDamaged, Superseded
from pibackup.modes.journal.restore import copy_snapshot
from pibackup.rules.replayguard import Refused, check_frame
from pibackup.rules.replayguard import connect as guarded_connect
from pibackup.store import directory as dst
from pibackup.store.chain import DamageError, End, generation_info, iter_frames
from pibackup.store.journal import (
    HEADER_SIZE,
    KIND_INFO,
    KIND_PRAGMA,
    Frame,
    JournalError,
    SegmentHeader,
    SegmentReader,
    SegmentWriter,
    fsync_dir,
    fsync_file,
)
from pibackup.store.replay import REPLAY_BATCH, Outcome, OutputError, Replayer, refused_damage
from pibackup.store.snapshot import private_file, read_data_version, sha256_file
from pibackup.testpoints import crash_point

RETRY_AFTER_FAILURE = 3600.0  # automatic retries of a failed compaction; the RPC retries at once
CHECK_INTERVAL = 30.0  # the thread also wakes at once when a flush crosses the threshold
# A compaction process started ahead and not used by then is stopped (shorter in tests).
SPARE_IDLE = float(os.environ.get("PIBACKUP_TEST_SPARE_IDLE", 60.0))
COMPACTION_NICE = 10  # added to the plugin's niceness, in the compaction's process
_CAUGHT_UP_BYTES = 64 * 1024  # copy at most about this much while holding the writer's lock
_COPY_BATCH = 64 * 1024  # frames copied per write + fdatasync (small for peak RSS; one sync under the lock)
_SYNC_EVERY = 1 << 20  # the snapshot copy is synced every MiB (the hook's syncs never wait behind a big one)
_MAX_ROUNDS = 32  # the child catches up with the writer at most this many times before it finishes


__all__ = ["CompactionError", "GenerationDamaged", "Superseded"]  # moved: removed in the sweep (modes/journal/port.py)

# --- the child process: snapshot + journal up to the cut (and past it) -> new snapshot ----
class JournalFollower:
    """Reads a generation's journal from its cut on: segment `first` at `offset`, where the
    writer restarted its deflate stream (`checksum`: the chain value there). Each call of
    frames() goes up to what the writer has made durable, across roll-overs, checking that
    each segment continues the one before and that nothing durable is unreadable. Frames
    before `skip_to` (segment, offset) are read but not returned."""

    def __init__(self, gen_path: str, first: int, offset: int, checksum: int, skip_to: Tuple[int, int] = (0, 0)):
        self.gen_path = gen_path
        self.index = first
        self.skip_to = tuple(skip_to)
        self._resume: Optional[Tuple[int, int]] = (offset, checksum)
        self._reader: Optional[SegmentReader] = None
        self._prev_end: Optional[Tuple[int, int]] = None  # (valid length, last checksum) of the segment before
        self._offset = offset

    def position(self) -> Tuple[int, int]:
        """(segment, offset) up to which the journal has been read."""
        return self.index, self._reader.valid_length if self._reader is not None else self._offset

    def frames(self, segment: int, durable: int, checksum: Optional[int] = None) -> Iterator[Tuple[Frame, str]]:
        """The frames up to (`segment`, `durable` bytes), with "file offset N" for messages;
        `checksum`, when known, is the writer's chain value there. Closed segments are read
        to their end."""
        while True:
            if self._reader is None:
                path = os.path.join(self.gen_path, dst.segment_filename(self.index))
                try:
                    self._reader = SegmentReader(path)
                except (JournalError, OSError) as e:
                    raise CompactionError(f"cannot follow {path}: {e}") from e
                h = self._reader.header
                if self._prev_end is not None and (h.prev_valid_length, h.prev_checksum) != self._prev_end:
                    raise DamageError(f"{path}: does not continue the segment before it", path, 0)
                if self._resume is not None:
                    self._reader.resume_at(*self._resume)
                    self._resume = None
            r = self._reader
            closed = self.index < segment
            for f in r.frames(None if closed else durable):
                if (self.index, f.offset) >= self.skip_to:
                    yield f, f"{r.path} offset {f.offset}"
            if not closed:
                if r.valid_length != durable or (checksum is not None and r.final_checksum != checksum):
                    # Never switch to a generation short of an acknowledged frame (nor loop
                    # forever waiting for one that cannot be read).
                    raise DamageError(
                        f"{r.path}: its frames end at offset {r.valid_length} ({r.bad_reason or 'checksum chain differs'}), "
                        f"its writer's at {durable}",
                        r.path,
                        r.valid_length,
                    )
                return
            if r.bad_offset is not None and not r.torn:
                raise DamageError(f"{r.path}: damaged at offset {r.bad_offset} ({r.bad_reason})", r.path, r.bad_offset)
            self._prev_end = (r.valid_length, r.final_checksum)
            r.close()
            self._reader = None
            self.index += 1
            self._offset = HEADER_SIZE

    def close(self) -> None:
        if self._reader is not None:
            self._offset = self._reader.valid_length  # position() stays right
            self._reader.close()
            self._reader = None


def build_snapshot(
    gen: dst.Generation,
    segments: int,
    partial: str,
    limit: Optional[int] = None,
    checksum: Optional[int] = None,
    more: Optional[Callable[[Tuple[int, int]], Optional[Tuple[int, int]]]] = None,
) -> Built:
    """Replay generation `gen`'s snapshot and its first `segments` segments (the last of them
    up to `limit` bytes, the cut) into `partial`/snapshot-vV.sqlite3, synced, named by V, its
    last confirmed version. The newest transaction (and the PRAGMA frames after it) may still
    be rewound: it is returned in `pending`, for the new generation's journal, and is not in
    the snapshot.

    With `more` (and the cut's `checksum`), the journal written since the cut is replayed
    too: `more(position)` says how far the writer has made it durable (segment, bytes), or
    None to stop. Whatever is replayed here is not copied into the new generation's journal
    afterwards, so the journal both generations hold shrinks to what is written while the
    snapshot is finished. `end` in the result is where the replay stopped."""
    info = generation_info(gen)
    part = dst.Generation(gen.number, gen.path, gen.snapshots, gen.segments[:segments])
    tmp = os.path.join(partial, "snapshot.tmp")
    if gen.snapshot is not None:
        copy_snapshot(gen.snapshot, tmp, info.snapshot_sha256, sync_every=_SYNC_EVERY)
    else:
        os.close(private_file(tmp))
    out = Outcome(gen.name, info.base_version, info.base_version)
    parent = os.getppid()
    # This process runs as lightningd's user: the journal's statements go through the replay
    # guard (a refused one is a DamageError: the generation is replaced from the live DB).
    conn = guarded_connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")  # as lightningd's own connection
        conn.execute("PRAGMA journal_mode = MEMORY")  # a crash leaves a .partial, removed at the next start
        conn.execute("PRAGMA synchronous = OFF")  # one fsync at the end
        conn.execute("PRAGMA cache_size = -2048")  # 2 MiB, whatever the size of the journal
        replayer = Replayer(conn, info.base_version, out, batch=REPLAY_BATCH)
        for n, (frame, where) in enumerate(iter_frames(part, End(), limit)):
            replayer.feed(frame, where)
            if n % 256 == 0:
                if os.getppid() != parent:  # the plugin died: its next start removes the .partial
                    raise CompactionError("the plugin exited")
                if n:
                    crash_point("child-replay")
        end = (segments, limit if limit is not None else 0)
        if more is not None and limit is not None and checksum is not None:
            tail = JournalFollower(gen.path, segments, limit, checksum)
            try:
                for _ in range(_MAX_ROUNDS):
                    target = more(tail.position())
                    if target is None or os.getppid() != parent:
                        break
                    for frame, where in tail.frames(*target):
                        replayer.feed(frame, where)
                end = tail.position()
            finally:
                tail.close()
        replayer.commit()
        version = replayer.current
        if out.transactions:
            got = read_data_version(conn)
            if got != version:
                raise CompactionError(f"replayed snapshot says data_version {got}, the journal {version}")
        pending: List[Frame] = ([replayer.pending] if replayer.pending else []) + [f for f, _ in replayer.pending_pragmas]
        conn.execute("PRAGMA journal_mode = DELETE")
    finally:
        conn.close()
    if not out.transactions:
        os.unlink(tmp)
        raise NothingToDo(f"{gen.name} has no committed transaction after its snapshot yet")
    fsync_file(tmp)
    sha = sha256_file(tmp)
    final = os.path.join(partial, dst.snapshot_filename(version))
    os.rename(tmp, final)
    fsync_dir(partial)
    crash_point("child-snapshot")
    return Built(
        version, sha, os.path.getsize(final), out.transactions, [(f.kind, f.data_version, f.statements) for f in pending], end
    )


class NothingToDo(PibackupError):
    pass


def child_main() -> None:
    """`python3 -c ... child_main()` {"parent": PID}: reads its job (JSON, one line) from
    stdin, builds the snapshot, prints the result as JSON. Started ahead of time when the
    plugin expects a compaction soon (a spare), it waits for the job; end of input without
    one: it exits, nothing done."""
    start = Start.decode(sys.argv[1])
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the plugin
    except (OSError, AttributeError):
        pass
    if os.getppid() != start.parent:
        # The plugin died while this process was starting, before the line above could
        # tie us to it: its next start removes the .partial; never write into it again.
        sys.exit(3)
    try:
        # Below lightningd (the hook never waits for the replay), but not the lowest: at nice 19
        # a Pi whose cores are busy at nice 0 (bitcoind validating) left it about 1.5% of a
        # core; a compaction took 298 s instead of 14 and the backup passed 3x the database
        # (make bench, "every core busy"). At 10 it gets about a tenth, and kept 2.78x.
        os.nice(COMPACTION_NICE)
    except OSError:
        pass
    line = sys.stdin.readline()
    if not line:
        return  # a spare that was not needed
    job = Job.decode(line)
    gen = dst.Destination(job.destination).generations()
    src = next((g for g in gen if g.number == job.generation), None)
    result: Union[Built, Nothing, Failed]
    try:
        if src is None:
            raise CompactionError(f"generation {job.generation} vanished")
        result = build_snapshot(src, job.segments, job.partial, job.limit, job.checksum, _ask_parent)
    except NothingToDo as e:
        result = Nothing(str(e))
    except DamageError as e:
        # An unreadable file (EIO, a vanished stick) is the medium's failure, not damage a
        # new generation would cure; the next attempt or the writer's own errors tell.
        result = Failed(str(e), damaged=not isinstance(e.__cause__, OSError))
    except OutputError as e:
        full = OSError(errno.ENOSPC, "No space left on device", job.partial) if e.full else None
        result = Failed(_describe(full) if full else f"{e} (in {job.partial})")
    except (PibackupError, sqlite3.Error, OSError) as e:
        result = Failed(_describe(e))
    sys.stdout.write(result.encode())
    sys.stdout.flush()


def _ask_parent(position: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """The child's side of following the journal: say how far it has replayed, read how far
    the writer has made it durable since, or None (finish the snapshot now)."""
    sys.stdout.write(At(*position).encode())
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        return None
    reply = decode_reply(line)
    return (reply.segment, reply.durable) if isinstance(reply, More) else None


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError):
        from pibackup.store.fsio import io_error_message

        return io_error_message(e, str(e.filename or "the backup directory"))
    if isinstance(e, sqlite3.Error):
        return f"SQLite: {e}"
    return str(e)


# --- retention ---------------------------------------------------------------------------
def apply_retention(dest: dst.Destination, keep: int, log: Any, protect: int, configured: int = 0) -> List[str]:
    """Delete complete generations older than the newest `keep`, never the one numbered
    `protect` (the writer's) or anything newer."""
    gens = [g for g in dest.generations() if g.number < protect]
    newer = len(dest.generations()) - len(gens)
    doomed = gens[: max(0, len(gens) - max(0, keep - newer))]
    for g in doomed:
        dest.delete_generation(g)
        crash_point("retention")
        log(f"deleted backup generation {g.name} (pibackup-keep-generations={configured or keep})", "info")
    return [g.name for g in doomed]


# --- the compactor thread in the plugin -----------------------------------------------------
class Compactor:
    """Watches the writer's generation; compacts it in the background when its journal
    passes `ratio` times its snapshot (and `min_bytes`), or when asked."""

    def __init__(self, ratio: float, min_bytes: int, keep: int, log: Any):
        self.ratio = ratio
        self.min_bytes = min_bytes
        self.keep = keep
        self.log = log
        self._port: Optional[CompactionPort] = None  # the writer, once bound
        self.state = "idle"  # idle, running or failed
        self.step = ""
        self.error: Optional[str] = None
        self.last: Optional[Dict[str, Any]] = None
        self.runs = 0
        self._failed_at: Optional[float] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._manual = False
        self._retain = True  # once at start (keep-generations may have been lowered), and after a gap
        self._child: Optional[subprocess.Popen[bytes]] = None
        self._source = ""  # the generation being compacted
        # At a high rate a compaction's own start-up (a new Python process) is a good part of
        # it, and the journal written meanwhile is held twice; so when the next compaction is
        # near as one ends, its process is started at once and waits for its job.
        self._spare: Optional[Tuple[subprocess.Popen[bytes], float]] = None
        self.started_ahead = 0
        # Journal bytes written to the previous generation while it was being compacted (at a
        # high rate, a good part of a threshold): it keeps them, and the new generation holds
        # them again, so they are taken off the new generation's threshold. The kept
        # generations' journals then stay within about two thresholds at any rate.
        self.overshoot = 0
        self._thread = threading.Thread(target=self._loop, name="pibackup-compactor", daemon=True)

    @property
    def port(self) -> CompactionPort:
        assert self._port is not None, "Compactor.bind() was not called"
        return self._port

    def bind(self, port: CompactionPort) -> None:
        """The writer it compacts (built after the compactor: the writer takes its hooks)."""
        self._port = port

    def start(self) -> None:
        self._thread.start()

    def flushed(self, journal_bytes: int, snapshot_bytes: int) -> None:
        """The writer flushed (under its lock): wake the thread once the journal passes the threshold."""
        if self.state != "running":
            limit = self.threshold(snapshot_bytes)
            if limit is not None and journal_bytes >= limit:
                self._wake.set()

    def threshold(self, snapshot_bytes: int) -> Optional[int]:
        """Journal bytes at which the generation is compacted; None when automatic compaction is off."""
        if self.ratio <= 0:
            return None
        return max(self.min_bytes, int(self.ratio * snapshot_bytes) - self.overshoot)

    def request(self) -> str:
        """`lightning-cli pibackup-compact`: start one now (in the background)."""
        if self.state == "running":
            return "already running"
        if self.port.state().damaged is not None:
            return "refused"  # its replacement is a snapshot of the live database, at the next write
        self.state, self.step, self.error = "running", "queued", None
        self._manual = True
        self._wake.set()
        return "started"

    def wake(self) -> None:
        self._wake.set()

    def new_generation(self) -> None:
        """A new generation started (a gap): apply retention in the background."""
        self.overshoot = 0
        self._failed_at = None  # a failure compacting the old generation says nothing of the new one
        self._retain = True
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()
        if self._thread.is_alive():
            self._thread.join()
        self._drop_spare()

    def status(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"state": self.state, "runs": self.runs, "processes_started_ahead": self.started_ahead}
        if self.state == "running":
            out["step"] = self.step
        if self.error:
            out["error"] = self.error
        if self.last:
            out["last"] = self.last
        journal_bytes, snapshot_bytes = self.port.sizes()
        out["journal_bytes"] = journal_bytes
        out["snapshot_bytes"] = snapshot_bytes
        out["compact_at_bytes"] = self.threshold(snapshot_bytes)
        out["keep_generations"] = self.keep
        return out

    # --- the thread ---------------------------------------------------------------------
    def _due(self) -> bool:
        if self.port.state().damaged is not None:
            return False  # the next write replaces the generation: compacting it would only read the damage again
        if self._manual:
            return True
        journal_bytes, snapshot_bytes = self.port.sizes()
        limit = self.threshold(snapshot_bytes)
        if limit is None or journal_bytes < limit:
            return False
        return self._failed_at is None or time.monotonic() - self._failed_at >= RETRY_AFTER_FAILURE

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._retain:
                self._retain = False
                try:
                    current = self.port.state().number
                    if current is not None:
                        apply_retention(self.port.dest, self.keep, self.log, protect=current)
                except OSError as e:
                    self.log(f"could not delete an old backup generation: {_describe(e)}", "warn")
            spare_left = SPARE_IDLE - (time.monotonic() - self._spare[1]) if self._spare else CHECK_INTERVAL
            self._wake.wait(max(0.0, min(CHECK_INTERVAL, spare_left)))
            self._wake.clear()
            failed = self.port.state().failure is not None
            if self._stop.is_set() or failed or not self._due():
                if self._spare is not None and (failed or time.monotonic() - self._spare[1] >= SPARE_IDLE):
                    self._drop_spare()
                continue
            self._manual = False
            self.state, self.error, self.step = "running", None, "cut"
            started = time.monotonic()
            try:
                try:
                    self.last = self._compact()
                finally:
                    self.port.trim_closed()  # the segment the switch closed: off the hook's path
                if self.last is not None:
                    self.last["seconds"] = round(time.monotonic() - started, 3)
                    self.runs += 1
                self.state, self._failed_at = "idle", None
            except _Stopped:
                self.state = "idle"
            except Superseded as e:
                self.state = "idle"
                self.log(str(e), "info")
            except (GenerationDamaged, DamageError) as e:
                # The generation being written to cannot be restored whole: the fix is a new
                # generation from the live database, not a retry of this compaction. (The
                # state first: the new generation's retain() resets _failed_at.)
                self.state, self.error, self._failed_at = "failed", str(e), self._failure_time()
                self.port.mark_damaged(self._source, str(e))
            except Exception as e:  # a failed compaction never fails the backup: it goes on in the old generation
                msg = _describe(e) if isinstance(e, (OSError, sqlite3.Error)) else str(e)
                if not isinstance(e, (PibackupError, OSError, sqlite3.Error)):
                    msg = f"internal error ({type(e).__name__}: {e}); please report it"
                self.state, self.error, self._failed_at = "failed", msg, self._failure_time()
                if self.port.state().failure is not None:
                    self.log(f"compaction failed: {msg}", "warn")  # and the backup with it: logged as an error already
                    continue
                self.log(
                    f"compaction failed: {msg}. The backup goes on in the current generation; the next automatic "
                    f"attempt is in {int(RETRY_AFTER_FAILURE // 60)} minutes, or run lightning-cli pibackup-compact",
                    "warn",
                )

    def _failure_time(self) -> Optional[float]:
        """When the failed compaction's generation is still the writer's: the retry waits.
        After a gap (whose retain() may already have run) the new generation owes it nothing."""
        return time.monotonic() if self.port.state().generation == self._source else None

    def _compact(self) -> Optional[Dict[str, Any]]:
        b = self.port
        self._source = b.state().generation or ""  # until the cut says which one
        cut = b.cut()  # under the writer's lock: where the durable journal ends
        if cut is None:
            if b.state().failure is None:
                self.log("nothing to compact: no transaction committed since the current generation's snapshot", "info")
            return None
        src, segments, length, checksum, number = cut.generation, cut.segment, cut.length, cut.checksum, cut.number
        self._source = src.path  # for a damage found on the way (_loop)
        crash_point("cut")
        partial = ""
        target: Optional[_NewGeneration] = None
        try:
            self.step = "retention"
            # The generation being built counts toward keep-generations: older ones go now, so
            # the medium never holds more than `keep` generations' worth (FORMAT.md, Retention).
            apply_retention(b.dest, max(1, self.keep - 1), self.log, protect=src.number, configured=self.keep)
            self.step = "snapshot"
            partial = b.dest.begin_generation(number)
            built = self._run_child(src, segments, length, checksum, partial)
            if built is None:
                shutil.rmtree(partial, ignore_errors=True)
                self.log(f"nothing to compact: {src.name} holds no committed transaction after its snapshot yet", "info")
                return None
            self.step = "journal"
            self._spare_if_busy(b.sizes()[0] - cut.journal_bytes)
            target = _NewGeneration(b, partial, number, built, src)
            crash_point("segment")
            target.follow(src, segments, length, checksum, self._stop)
            self.step = "switch"
            target.writer.preallocate_ahead(target.chunk)  # the zeros now, not on the hook's next call
            switched = b.switch(target.source_number, target.finish)  # under the writer's lock
            target.adopted = True
            final = switched.generation
            # The old generation stays (keep >= 2) holding what it grew by.
            self.overshoot = switched.grown if self.keep >= 2 else 0
            partial = ""
            self.step = "retention"
            apply_retention(b.dest, self.keep, self.log, protect=number)
        except BaseException:
            if target is not None:
                target.abort()
            if partial:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            b.release()
        self.log(
            f"compacted {src.name} into {os.path.basename(final)}: snapshot at data_version {built.version} "
            f"({built.snapshot_bytes:,} bytes) from {built.transactions:,} journalled transactions",
            "info",
        )
        return {
            "generation": os.path.basename(final),
            "from": src.name,
            "base_version": built.version,
            "snapshot_bytes": built.snapshot_bytes,
            "transactions": built.transactions,
            "finished": int(time.time()),
        }

    def _converse(self, child: subprocess.Popen[bytes], src: dst.Generation, job: Job) -> bytes:
        """Send the job; answer each "at" (how far the child has replayed) with how far the
        writer has made the journal durable since, until less than _CAUGHT_UP_BYTES is left
        (then "done": the child finishes the snapshot). Returns the result line (b"" if the
        child died or stopped)."""
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(job.encode().encode())
            child.stdin.flush()
            while True:
                line = child.stdout.readline()
                at = At.decode(line)
                if at is None:
                    return line
                pos = self.port.position(src.number)
                more = pos is not None and (pos[0] != at.segment or pos[1] - at.offset >= _CAUGHT_UP_BYTES) and not self._stop.is_set()
                reply: Union[More, Done] = More(*pos) if pos is not None and more else Done()
                child.stdin.write(reply.encode().encode())
                child.stdin.flush()
        except (BrokenPipeError, ValueError):
            return b""  # (communicate() then closes its stdin and collects what is left)

    def _spawn(self) -> subprocess.Popen[bytes]:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above pibackup/compaction/
        code = f"import sys; sys.path.insert(0, {root!r}); from pibackup.compaction.compact import child_main; child_main()"
        return subprocess.Popen(  # -I (isolated), as the Debian package runs the plugin itself
            [sys.executable, "-I", "-c", code, Start(os.getpid()).encode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def _spare_if_busy(self, tail: int) -> None:
        """Start the next compaction's process now if `tail`, the journal written during a
        compaction (held by both generations), is a good part of a threshold: at such a rate
        the next compaction is due soon after this one, and its start-up would lengthen it."""
        if self.ratio > 0 and self._spare is None and tail >= max(self.min_bytes, int(self.ratio * self.port.sizes()[1])) // 4:
            try:
                self._spare = (self._spawn(), time.monotonic())
            except OSError as e:  # only a head start lost: the next compaction starts its own
                self.log(f"could not start the next compaction's process ahead: {e}", "debug")
                return
            self.started_ahead += 1

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare[0].kill()
            spare[0].communicate()

    def _run_child(self, src: dst.Generation, segments: int, length: int, checksum: int, partial: str) -> Optional[Built]:
        job = Job(self.port.destination, src.number, segments, length, checksum, partial)
        spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is not None:
            spare[0].communicate()
            spare = None
        child = spare[0] if spare is not None else self._spawn()
        self._child = child
        try:
            out = self._converse(child, src, job)
            err = child.communicate()[1]
        finally:
            self._child = None
        if self._stop.is_set():
            raise _Stopped()
        if child.returncode != 0 or not out:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
            raise CompactionError(f"the compaction process died ({tail[0]})")
        result = decode_result(out)
        if isinstance(result, Failed):
            kind = GenerationDamaged if result.damaged else CompactionError
            raise kind(f"cannot build the new snapshot from {src.name}: {result.error}")
        if isinstance(result, Nothing):
            return None
        return result


class _Stopped(Exception):
    pass


class _NewGeneration:
    """The `.partial` generation being written: its snapshot is done, its journal is the
    tail of the old generation's, copied frame by frame."""

    def __init__(self, b: CompactionPort, partial: str, number: int, built: Built, src: dst.Generation):
        self.port = b
        self.adopted = False  # the writer went on in its open segment (the switch)
        self.partial = partial
        self.number = number
        self.version = built.version
        header = SegmentHeader(
            generation=number,
            generation_id=os.urandom(16),
            segment=1,
            base_version=self.version,
            snapshot_sha256=built.sha256,
            created=int(time.time()),
            flags=b.segment_flags,
        )
        # No zeros ahead while only the tail is copied in: the hook's appends get them after
        # the switch (they would be space held twice while both generations are on the medium).
        self.chunk = b.chunk_for(built.snapshot_bytes)
        self.writer = SegmentWriter.create(os.path.join(partial, dst.segment_filename(1)), header, 0)
        self.writer.add(KIND_INFO, self.version, b.info_lines())
        self.last = self.version
        for kind, version, statements in built.pending:
            self.writer.add(kind, version, statements)
            self.last = version
        self.writer.flush()
        self.closed_bytes = 0  # valid bytes of the new generation's closed segments
        self._follower: Optional[JournalFollower] = None
        self._end = built.end  # the child replayed up to here
        self.source_number = src.number

    def add(self, frame: Frame, where: str = "") -> None:
        if frame.kind == KIND_INFO:
            return
        try:
            # Frames the child did not replay: a statement a restore would refuse is never
            # carried into the new generation (the old one is damaged: Backup.mark_damaged).
            check_frame(frame.statements, frame.kind == KIND_PRAGMA)
        except Refused as e:
            raise refused_damage(e, where or f"{self.partial} (copying)", frame.data_version, frame.offset) from e
        if frame.data_version not in (self.last, (self.last + 1) & 0xFFFFFFFF):
            # Each frame appends, rewinds or repeats the version (FORMAT.md, replay rules):
            # anything else would make the new generation unrestorable. Never switch to it.
            raise CompactionError(
                f"the journal to copy does not follow the new snapshot: data_version {frame.data_version} "
                f"after {self.last} (internal error; please report it)"
            )
        self.last = frame.data_version
        self.writer.add(frame.kind, frame.data_version, frame.statements)
        if self.writer.pending_bytes >= _COPY_BATCH:  # memory stays bounded however far behind
            self.flush()

    def flush(self) -> None:
        w = self.writer
        w.flush()
        if w.size >= self.port.segment_bytes:
            h = w.header
            nxt = SegmentHeader(
                generation=h.generation,
                generation_id=h.generation_id,
                segment=h.segment + 1,
                base_version=h.base_version,
                snapshot_sha256=h.snapshot_sha256,
                prev_valid_length=w.size,
                prev_checksum=w.checksum,
                created=int(time.time()),
                flags=h.flags,
            )
            self.writer = SegmentWriter.create(os.path.join(self.partial, dst.segment_filename(nxt.segment)), nxt, w.preallocate)
            self.closed_bytes += w.size
            w.close()

    def follow(self, src: dst.Generation, first: int, offset: int, checksum: int, stop: threading.Event) -> None:
        """Copy the old generation's frames from the cut (`offset` of segment `first`;
        `checksum` is the chain value there) on, those the child replayed left out, while
        the hook keeps appending to it, until little is left to copy: the rest is copied
        under the lock."""
        self._follower = JournalFollower(src.path, first, offset, checksum, skip_to=self._end)
        while True:
            if stop.is_set():
                raise _Stopped()
            self.copy_available(*self._position(src))
            self.flush()
            crash_point("follow")
            # Caught up when little is left behind the writer: that rest is copied under its
            # lock. Otherwise go on at once (no pause: at a high rate a pause only lets the
            # tail grow, and the tail is held by both generations).
            segment, durable = self._position(src)
            at, offset_read = self._follower.position()
            if at == segment and durable - offset_read < _CAUGHT_UP_BYTES:
                return

    def _position(self, src: dst.Generation) -> Tuple[int, int]:
        state = self.port.position(src.number)
        if state is None:
            raise Superseded("a new generation was started meanwhile (a gap); this compaction is dropped")
        return state

    def copy_available(self, segment: int, durable: int, checksum: Optional[int] = None) -> None:
        """Copy the frames of the old generation up to (`segment`, `durable` bytes): what its
        writer has made durable (`checksum`: its chain value there, when known)."""
        assert self._follower is not None
        for f, where in self._follower.frames(segment, durable, checksum):
            self.add(f, where)

    def finish(self, segment: int, durable: int, checksum: int) -> Finished:
        """At the switch, under the writer's lock: copy the frames up to the writer's durable
        end (`checksum`: its chain value there) and sync them."""
        first = self.writer.header.segment
        self.copy_available(segment, durable, checksum)
        self.flush()
        self.close()
        return Finished(self.partial, self.writer, self.closed_bytes, self.version, dir_synced=self.writer.header.segment == first)

    def close(self) -> None:
        if self._follower is not None:
            self._follower.close()

    def abort(self) -> None:
        """A failed compaction: close its files (the caller removes the .partial)."""
        self.close()
        if not self.adopted:
            self.writer.close()
