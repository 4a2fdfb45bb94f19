"""The compaction process: a new snapshot replayed from a generation's snapshot and journal
(never from the live DB), started by process.py, talking to it in messages.py's lines.

The child (`build_snapshot`) replays the journal up to where it ended at the cut (appends
never change those bytes), then follows what the writer makes durable after it until it is
close behind. Steps, and what a crash at each leaves, are in FORMAT.md ("Compaction").
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import sys
from typing import Callable, List, Optional, Tuple, Union

from pibackup.compaction.messages import At, Built, Failed, Job, More, Nothing, Start, decode_reply
from pibackup.errors import DamageError, PibackupError
from pibackup.modes.journal.port import CompactionError
from pibackup.rules.replayguard import connect as guarded_connect
from pibackup.store import directory as dst
from pibackup.store import snapfile
from pibackup.store.chain import End, iter_frames
from pibackup.store.follow import JournalFollower
from pibackup.store.fsio import fsync_dir, io_error_message, private_file
from pibackup.store.generation import generation_info
from pibackup.store.layout import SNAPSHOT_TMP, snapshot_filename
from pibackup.store.output import copy_snapshot
from pibackup.store.replay import REPLAY_BATCH, Outcome, OutputError, Replayer
from pibackup.store.segment import Frame
from pibackup.store.snapshot import read_data_version
from pibackup.testpoints import crash_point

COMPACTION_NICE = 10  # added to the plugin's niceness, in the compaction's process
_SYNC_EVERY = 1 << 20  # the snapshot copy is synced every MiB (the hook's syncs never wait behind a big one)
_MAX_ROUNDS = 32  # the child catches up with the writer at most this many times before it finishes


def build_snapshot(
    gen: dst.Generation,
    segments: int,
    partial: str,
    limit: Optional[int] = None,
    checksum: Optional[int] = None,
    more: Optional[Callable[[Tuple[int, int]], Optional[Tuple[int, int]]]] = None,
) -> Built:
    """Replay generation `gen`'s snapshot and its first `segments` segments (the last of them
    up to `limit` bytes, the cut) into `partial`/snapshot-vV.pbsnap (compressed), synced, named by V, its
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
    tmp = os.path.join(partial, SNAPSHOT_TMP)
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
        identity = snapfile.identity_rows(conn)
        conn.execute("PRAGMA journal_mode = DELETE")
    finally:
        conn.close()
    if not out.transactions:
        os.unlink(tmp)
        raise NothingToDo(f"{gen.name} has no committed transaction after its snapshot yet")

    def still_wanted(_done: int) -> None:
        if os.getppid() != parent:
            raise CompactionError("the plugin exited")

    # The work file is compressed into the new snapshot; chunks whose bytes the journal did
    # not change are carried from the old snapshot as they are stored (docs/design/compaction.md).
    final = os.path.join(partial, snapshot_filename(version))
    written = snapfile.write_compressed(
        tmp, final, version, identity, previous=gen.snapshot, sync_every=_SYNC_EVERY, tick=still_wanted
    )
    os.unlink(tmp)
    fsync_dir(partial)
    crash_point("child-snapshot")
    return Built(
        version, written.sha256, written.size, out.transactions, [(f.kind, f.data_version, f.statements) for f in pending], end
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
        return io_error_message(e, str(e.filename or "the backup directory"))
    if isinstance(e, sqlite3.Error):
        return f"SQLite: {e}"
    return str(e)
