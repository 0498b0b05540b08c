//! The embedded traffic log's on-disk store: an append-only log of opaque byte entries
//! kept in segment files. Synchronous and single-writer; [`crate::FileLog`] builds its
//! group-commit writer thread on top of it.
//!
//! # Files
//!
//! A log directory holds segment files named by the offset of their first entry,
//! zero-padded to 20 digits (`00000000000000000000.log`, `00000000000000004711.log`, …),
//! each with a sparse index beside it (`<same>.idx`), plus a `LOCK` file that keeps a
//! second [`SegmentLog`] out of the directory. Other files are ignored.
//!
//! A segment file is an 8-byte header — the magic `CTSG` and a `u32` LE format version
//! (1) — followed by entries:
//!
//! ```text
//! u32 LE payload length | u64 LE offset | payload | u32 LE CRC32C(length, offset, payload)
//! ```
//!
//! Payloads are at most [`MAX_ENTRY_BYTES`]. Offsets are a global, gap-free counter from
//! 0 across all segments; each entry carries its own, so a misplaced entry is detected.
//!
//! The index is a sequence of 12-byte points `u32 LE offset relative to the segment's
//! first | u64 LE byte position of that entry`, one about every `index_interval_bytes`
//! of entries. It is an optimisation only: readers use it to seek, and anything
//! implausible in it (not increasing, past the end of the log file, naming a position
//! that does not hold the entry it claims) is ignored and rebuilt.
//!
//! # Guarantees
//!
//! - [`SegmentLog::append`] hands entries to the OS before returning; [`SegmentLog::sync`]
//!   fsyncs them and reports the durable end. The one exception to "append never
//!   fsyncs": rolling to a new segment first fsyncs the segment being sealed (and the
//!   directory), so a segment that has a successor is always complete on disk and only
//!   the **last** segment can ever have a torn tail after a crash.
//! - Index points are written to disk only after the log bytes they name have been
//!   fsynced. Recovery therefore resumes validation at the last index point whose entry
//!   is intact: everything before it was durable before the point existed.
//! - [`SegmentLog::open`] truncates a torn or corrupt tail of the last segment — the
//!   first entry that is incomplete, fails its CRC, has a length over the maximum or the
//!   wrong offset, and everything after it — so exactly the intact prefix remains.
//!   Sealed segments are never truncated: a damaged tail, a wrong entry count or a bad
//!   header there is [`SegmentError::Corrupt`]. To keep opening cheap, a sealed segment
//!   is validated from its last good index point to its end (which catches truncation
//!   and a torn tail); bit rot further inside any segment is caught by the CRC check of
//!   every read ([`SegmentReader`] yields `Corrupt`) rather than at open.
//! - A last segment shorter than its header or with an all-zero header was torn while
//!   being created (its header never became durable, so neither did any entry): it is
//!   reset to an empty segment. An empty last segment is kept and appended to.
//! - After an I/O error in `append` or `sync` the log refuses further writes
//!   ([`SegmentError::Poisoned`]): the file state is unknown (and a failed fsync cannot
//!   be retried safely). Reopening recovers the intact prefix.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest payload one entry may carry (16 MiB).
pub const MAX_ENTRY_BYTES: usize = 16 << 20;
/// Size of the segment file header: magic `CTSG` + `u32` LE version.
pub const SEGMENT_HEADER_BYTES: u64 = 8;
const HEADER: [u8; 8] = *b"CTSG\x01\0\0\0";
/// Length, offset and CRC around each payload.
const ENTRY_OVERHEAD: u64 = 16;
const INDEX_POINT_BYTES: usize = 12;
/// Appends are written in chunks of about this size (one `write` per chunk).
const WRITE_CHUNK: usize = 256 << 10;
const LOCK_FILE: &str = "LOCK";
/// How long `open` waits for a previous writer in this process (e.g. a writer thread
/// still shutting down) to release the directory lock.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Where and how a [`SegmentLog`] stores its entries.
#[derive(Debug, Clone)]
pub struct SegmentConfig {
    pub dir: PathBuf,
    /// roll to a new segment file once the active one reaches this many bytes (default 64 MiB)
    pub segment_bytes: u64,
    /// write a sparse-index entry every this many bytes of records (default 4096)
    pub index_interval_bytes: u64,
}

impl SegmentConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            index_interval_bytes: 4096,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    #[error(
        "segment store I/O failed on {path}: {source}; check the disk, free space and the directory's permissions"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "segment file {path} is corrupt at byte {offset}: {reason}; corruption away from the log's tail is never truncated automatically: restore the file from a backup, or move it and every later segment out of the directory to give up their entries"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "entry of {len} bytes exceeds the maximum of {max} bytes; split it or store large bodies elsewhere"
    )]
    EntryTooLarge { len: usize, max: usize },
    #[error(
        "offset {requested} is no longer stored (retention removed it); the oldest available offset is {first_available}"
    )]
    OffsetRemoved {
        requested: u64,
        first_available: u64,
    },
    #[error(
        "no entry with offset {offset} in {dir}, but the read was asked to run up to offset {end}; pass the writer's next_offset() or durable_offset() as the end"
    )]
    EndBeyondLog { dir: PathBuf, offset: u64, end: u64 },
    #[error(
        "{dir} is already open by another SegmentLog (it holds {dir}/LOCK); only one writer may use a directory: stop the other one or use another directory"
    )]
    Locked { dir: PathBuf },
    #[error(
        "the segment log refuses writes after an earlier failure ({reason}); drop it and reopen the directory, recovery keeps the intact prefix"
    )]
    Poisoned { reason: String },
}

/// What [`SegmentLog::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in the log after recovery.
    pub segments: usize,
    /// Entries in the log after recovery.
    pub entries: u64,
    /// Bytes cut off the last segment's torn or corrupt tail.
    pub truncated_bytes: u64,
    /// The segment file that was truncated, if any.
    pub truncated_file: Option<PathBuf>,
    /// Index files that were missing, stale or damaged and have been rewritten.
    pub rebuilt_indexes: usize,
}

/// The single writer of a segment directory. See the [module docs](self) for the format.
#[derive(Debug)]
pub struct SegmentLog {
    config: SegmentConfig,
    sealed: VecDeque<SealedSegment>,
    active: ActiveSegment,
    next_offset: u64,
    durable_offset: u64,
    /// A segment file was created since the directory was last fsynced.
    dir_dirty: bool,
    /// Encoded entries not yet written, and how many there are.
    scratch: Vec<u8>,
    scratch_entries: u64,
    poisoned: Option<String>,
    _lock: File,
}

#[derive(Debug)]
struct SealedSegment {
    base: u64,
    bytes: u64,
}

#[derive(Debug)]
struct ActiveSegment {
    base: u64,
    path: PathBuf,
    file: File,
    /// Bytes written to `file` (header included).
    len: u64,
    index_path: PathBuf,
    index: File,
    index_len: u64,
    /// Points not yet in the index file: they are written only after the log is fsynced.
    pending_index: Vec<IndexPoint>,
    bytes_since_index: u64,
    /// Written since the last fsync.
    dirty: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexPoint {
    rel: u32,
    pos: u64,
}

impl SegmentLog {
    /// Opens (creating the dir if missing) and recovers: validates the last segment from its last
    /// good sparse-index point (or from start) and truncates a torn or corrupt tail so that exactly
    /// the intact prefix of entries remains. Rebuilds the sparse index of that segment if it is stale.
    ///
    /// Sealed segments are checked from their last good index point to their end and must
    /// hold exactly the offsets up to the next segment's first; if not, this fails with
    /// [`SegmentError::Corrupt`] and changes nothing in them.
    pub fn open(config: SegmentConfig) -> Result<(SegmentLog, RecoveryReport), SegmentError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock = lock_dir(&dir)?;
        let bases = list_segments(&dir)?;
        let interval = config.index_interval_bytes;
        let mut report = RecoveryReport::default();
        let mut sealed = VecDeque::new();
        for pair in bases.windows(2) {
            sealed.push_back(check_sealed(&dir, pair[0], pair[1], interval, &mut report)?);
        }
        let (active, next_offset, dir_dirty) = match bases.last() {
            Some(&base) => {
                let (active, next) = recover_last(&dir, base, interval, &mut report)?;
                (active, next, false)
            }
            None => (ActiveSegment::create(&dir, 0)?, 0, true),
        };
        let first = sealed.front().map_or(active.base, |s| s.base);
        report.segments = sealed.len() + 1;
        report.entries = next_offset - first;
        let log = SegmentLog {
            config,
            sealed,
            active,
            next_offset,
            // Recovery fsynced the last segment and sealed ones were fsynced when sealed.
            durable_offset: next_offset,
            dir_dirty,
            scratch: Vec::new(),
            scratch_entries: 0,
            poisoned: None,
            _lock: lock,
        };
        Ok((log, report))
    }

    /// Appends entries in order; returns the offsets assigned (first..first+n). Offsets are a
    /// global, gap-free entry counter starting at 0 across all segments. Writes go to the OS
    /// (buffered writes are flushed to the file before returning) but are NOT fsynced.
    ///
    /// An oversized entry fails the whole batch before anything is written. Any I/O
    /// error poisons the log (see the module docs).
    pub fn append(&mut self, entries: &[&[u8]]) -> Result<Range<u64>, SegmentError> {
        self.check_usable()?;
        if let Some(big) = entries.iter().find(|e| e.len() > MAX_ENTRY_BYTES) {
            return Err(SegmentError::EntryTooLarge {
                len: big.len(),
                max: MAX_ENTRY_BYTES,
            });
        }
        let first = self.next_offset;
        let result = self.append_inner(entries);
        self.poison_on_err(result)?;
        Ok(first..self.next_offset)
    }

    fn append_inner(&mut self, entries: &[&[u8]]) -> Result<(), SegmentError> {
        for payload in entries {
            let mut rel = self.next_offset + self.scratch_entries - self.active.base;
            let size = self.active.len + self.scratch.len() as u64;
            // Roll lazily, before the first entry that would go past the limit, so only
            // the last segment can be empty; the index's relative offsets must fit a u32.
            if rel > 0 && (size >= self.config.segment_bytes || rel >= u64::from(u32::MAX)) {
                self.flush_scratch()?;
                self.roll()?;
                rel = 0;
            }
            let a = &mut self.active;
            let pos = a.len + self.scratch.len() as u64;
            if rel > 0 && a.bytes_since_index >= self.config.index_interval_bytes {
                // `rel < u32::MAX` by the roll condition above.
                a.pending_index.push(IndexPoint {
                    rel: rel as u32,
                    pos,
                });
                a.bytes_since_index = 0;
            }
            a.bytes_since_index += ENTRY_OVERHEAD + payload.len() as u64;
            encode_entry(&mut self.scratch, a.base + rel, payload);
            self.scratch_entries += 1;
            if self.scratch.len() >= WRITE_CHUNK {
                self.flush_scratch()?;
            }
        }
        self.flush_scratch()
    }

    /// Writes the encoded entries; `next_offset` only ever counts entries the OS has.
    fn flush_scratch(&mut self) -> Result<(), SegmentError> {
        if self.scratch.is_empty() {
            return Ok(());
        }
        let a = &mut self.active;
        a.dirty = true;
        a.file.write_all(&self.scratch).map_err(io_err(&a.path))?;
        a.len += self.scratch.len() as u64;
        self.next_offset += self.scratch_entries;
        self.scratch.clear();
        self.scratch_entries = 0;
        Ok(())
    }

    /// Seals the active segment — log, index and directory fsynced, so that only the
    /// last segment can ever be torn — and starts a new one at `next_offset`.
    fn roll(&mut self) -> Result<(), SegmentError> {
        self.sync_inner()?;
        let fresh = ActiveSegment::create(&self.config.dir, self.next_offset)?;
        let old = std::mem::replace(&mut self.active, fresh);
        self.sealed.push_back(SealedSegment {
            base: old.base,
            bytes: old.len + old.index_len,
        });
        self.dir_dirty = true;
        tracing::debug!(segment = %old.path.display(), next = self.next_offset, "sealed segment");
        Ok(())
    }

    /// fsync the active segment (and the directory after a roll, and the index file); returns the
    /// durable end offset (exclusive).
    pub fn sync(&mut self) -> Result<u64, SegmentError> {
        self.check_usable()?;
        let result = self.sync_inner();
        self.poison_on_err(result)
    }

    fn sync_inner(&mut self) -> Result<u64, SegmentError> {
        let a = &mut self.active;
        if a.dirty {
            a.file.sync_data().map_err(io_err(&a.path))?;
            a.dirty = false;
        }
        // Only now may index points name these bytes (see the module docs).
        if !a.pending_index.is_empty() {
            let mut buf = Vec::new();
            encode_index(&a.pending_index, &mut buf);
            a.index.write_all(&buf).map_err(io_err(&a.index_path))?;
            a.index.sync_data().map_err(io_err(&a.index_path))?;
            a.index_len += buf.len() as u64;
            a.pending_index.clear();
        }
        if self.dir_dirty {
            sync_dir(&self.config.dir)?;
            self.dir_dirty = false;
        }
        self.durable_offset = self.next_offset;
        Ok(self.durable_offset)
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn durable_offset(&self) -> u64 {
        self.durable_offset
    }

    /// The oldest offset still stored (retention moves it forward).
    pub fn first_offset(&self) -> u64 {
        self.sealed.front().map_or(self.active.base, |s| s.base)
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// Delete whole sealed segments whose entries all lie below `offset` (retention); never the active one.
    ///
    /// Removes oldest first and fsyncs the directory after each, so that a crash can
    /// never leave a gap between the segments that remain. Returns how many went.
    pub fn remove_segments_below(&mut self, offset: u64) -> Result<usize, SegmentError> {
        let mut removed = 0;
        while let Some(seg) = self.sealed.front() {
            let end = self.sealed.get(1).map_or(self.active.base, |s| s.base);
            if end > offset {
                break;
            }
            let dir = &self.config.dir;
            for path in [log_path(dir, seg.base), index_path(dir, seg.base)] {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(SegmentError::Io { path, source: e });
                    }
                    _ => {}
                }
            }
            sync_dir(dir)?;
            tracing::debug!(base = seg.base, end, "retention removed segment");
            self.sealed.pop_front();
            removed += 1;
        }
        Ok(removed)
    }

    /// The offset below which retention may remove segments: every whole sealed
    /// segment that lies below `archived` (already in the archive) and is older than
    /// `max_age` (by its file's modification time, when it was sealed) or keeps the
    /// log over `max_bytes`. Oldest first; never the active segment.
    pub fn retention_cutoff(
        &self,
        archived: u64,
        max_age: Option<std::time::Duration>,
        max_bytes: Option<u64>,
    ) -> u64 {
        let mut total = self.disk_bytes();
        let mut cutoff = self.first_offset();
        for (i, seg) in self.sealed.iter().enumerate() {
            let end = self.sealed.get(i + 1).map_or(self.active.base, |s| s.base);
            if end > archived {
                break;
            }
            let too_old = max_age.is_some_and(|age| {
                fs::metadata(log_path(&self.config.dir, seg.base))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|e| e > age)
            });
            let too_big = max_bytes.is_some_and(|b| total > b);
            if !(too_old || too_big) {
                break;
            }
            total = total.saturating_sub(seg.bytes);
            cutoff = end;
        }
        cutoff
    }

    /// Total bytes of all segment files (logs and their indexes).
    pub fn disk_bytes(&self) -> u64 {
        let sealed: u64 = self.sealed.iter().map(|s| s.bytes).sum();
        sealed + self.active.len + self.active.index_len
    }

    fn check_usable(&self) -> Result<(), SegmentError> {
        match &self.poisoned {
            Some(reason) => Err(SegmentError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison_on_err<T>(&mut self, result: Result<T, SegmentError>) -> Result<T, SegmentError> {
        if let Err(e) = &result {
            tracing::error!(error = %e, "segment log failed; refusing further writes");
            self.poisoned = Some(e.to_string());
        }
        result
    }
}

impl ActiveSegment {
    fn create(dir: &Path, base: u64) -> Result<Self, SegmentError> {
        let path = log_path(dir, base);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(&HEADER).map_err(io_err(&path))?;
        let index_path = index_path(dir, base);
        // Truncates an orphaned index left by an earlier file of the same name.
        let index = File::create(&index_path).map_err(io_err(&index_path))?;
        Ok(Self {
            base,
            path,
            file,
            len: SEGMENT_HEADER_BYTES,
            index_path,
            index,
            index_len: 0,
            pending_index: Vec::new(),
            bytes_since_index: 0,
            dirty: true,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Recovery

/// Checks a sealed segment `[base, end)` from its last good index point to its end,
/// rewriting its index if that is stale. Never modifies the log file.
fn check_sealed(
    dir: &Path,
    base: u64,
    end: u64,
    interval: u64,
    report: &mut RecoveryReport,
) -> Result<SealedSegment, SegmentError> {
    let path = log_path(dir, base);
    let file = File::open(&path).map_err(io_err(&path))?;
    let len = file.metadata().map_err(io_err(&path))?.len();
    let corrupt = |offset, reason| SegmentError::Corrupt {
        path: path.clone(),
        offset,
        reason,
    };
    if let Some(reason) = header_problem(read_header(&file, &path, len)?) {
        return Err(corrupt(0, reason));
    }
    let (points, clean) = read_index(&index_path(dir, base), len)?;
    let scan = scan_segment(&file, &path, base, points, interval)?;
    if let Some((pos, reason)) = scan.stop {
        return Err(corrupt(pos, format!("{reason} in a sealed segment")));
    }
    if scan.next_offset != end {
        return Err(corrupt(
            scan.end_pos,
            format!(
                "the segment holds offsets {base}..{} but the next segment starts at {end}",
                scan.next_offset
            ),
        ));
    }
    let index_len = if !clean || scan.index_changed {
        report.rebuilt_indexes += 1;
        write_index(&index_path(dir, base), &scan.points)?.1
    } else {
        (scan.points.len() * INDEX_POINT_BYTES) as u64
    };
    Ok(SealedSegment {
        base,
        bytes: len + index_len,
    })
}

/// Recovers the last segment: keeps exactly its intact prefix of entries, fsyncs it,
/// brings the index up to date and returns it as the active segment with the next offset.
fn recover_last(
    dir: &Path,
    base: u64,
    interval: u64,
    report: &mut RecoveryReport,
) -> Result<(ActiveSegment, u64), SegmentError> {
    let path = log_path(dir, base);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut len = file.metadata().map_err(io_err(&path))?.len();
    let header = read_header(&file, &path, len)?;
    if header.is_none_or(|h| h == [0; 8]) {
        // Torn while being created (the header is written first and was never made
        // durable), so it cannot hold a durable entry: start it afresh.
        if len > 0 {
            report.truncated_bytes += len;
            report.truncated_file = Some(path.clone());
        }
        file.set_len(0).map_err(io_err(&path))?;
        file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        file.write_all(&HEADER).map_err(io_err(&path))?;
        len = SEGMENT_HEADER_BYTES;
    } else if let Some(reason) = header_problem(header) {
        return Err(SegmentError::Corrupt {
            path,
            offset: 0,
            reason,
        });
    }
    let index_path = index_path(dir, base);
    let (points, clean) = read_index(&index_path, len)?;
    let scan = scan_segment(&file, &path, base, points, interval)?;
    if let Some((pos, reason)) = &scan.stop {
        let cut = len - scan.end_pos;
        tracing::warn!(
            segment = %path.display(), at = pos, bytes = cut, next_offset = scan.next_offset, %reason,
            "truncating the torn or corrupt tail of the last segment"
        );
        file.set_len(scan.end_pos).map_err(io_err(&path))?;
        report.truncated_bytes += cut;
        report.truncated_file = Some(path.clone());
    }
    // Always fsync, truncated or not: the previous process may have crashed with these
    // bytes only in the page cache, and the index points written next must never name
    // bytes that a power loss could still take away.
    file.sync_all().map_err(io_err(&path))?;
    let (index, index_len) = if !clean || scan.index_changed {
        report.rebuilt_indexes += 1;
        tracing::debug!(index = %index_path.display(), "rebuilt sparse index");
        write_index(&index_path, &scan.points)?
    } else {
        let mut index = OpenOptions::new()
            .write(true)
            .open(&index_path)
            .map_err(io_err(&index_path))?;
        let end = index.seek(SeekFrom::End(0)).map_err(io_err(&index_path))?;
        (index, end)
    };
    file.seek(SeekFrom::Start(scan.end_pos))
        .map_err(io_err(&path))?;
    let active = ActiveSegment {
        base,
        path,
        file,
        len: scan.end_pos,
        index_path,
        index,
        index_len,
        pending_index: Vec::new(),
        bytes_since_index: scan.bytes_since_index,
        dirty: false,
    };
    Ok((active, scan.next_offset))
}

/// The result of reading a segment forward until its end or its first bad entry.
struct Scan {
    /// Byte position just past the last good entry.
    end_pos: u64,
    /// Offset the next entry would get.
    next_offset: u64,
    /// The trusted index points plus those for the entries scanned.
    points: Vec<IndexPoint>,
    index_changed: bool,
    bytes_since_index: u64,
    /// Position and description of the first bad entry, if the scan did not end at EOF.
    stop: Option<(u64, String)>,
}

/// Validates entries from the last index point whose entry is intact (or from the
/// header), regenerating index points exactly as `append` places them.
fn scan_segment(
    file: &File,
    path: &Path,
    base: u64,
    mut points: Vec<IndexPoint>,
    interval: u64,
) -> Result<Scan, SegmentError> {
    let io = io_err(path);
    let mut reader = BufReader::with_capacity(64 << 10, file);
    let mut payload = Vec::new();
    let found = points.len();
    let (mut offset, mut pos) = loop {
        let Some(p) = points.last().copied() else {
            break (base, SEGMENT_HEADER_BYTES);
        };
        let at = base + u64::from(p.rel);
        reader.seek(SeekFrom::Start(p.pos)).map_err(io)?;
        if let Decoded::Entry { .. } = read_entry(&mut reader, at, &mut payload).map_err(io)? {
            break (at, p.pos);
        }
        points.pop();
    };
    let mut index_changed = points.len() != found;
    reader.seek(SeekFrom::Start(pos)).map_err(io)?;
    let mut since = 0;
    let stop = loop {
        match read_entry(&mut reader, offset, &mut payload).map_err(io)? {
            Decoded::End => break None,
            Decoded::Bad(reason) => break Some((pos, reason)),
            Decoded::Entry { len } => {
                if let Ok(rel) = u32::try_from(offset - base)
                    && rel > 0
                    && since >= interval
                    && points.last().is_none_or(|l| l.rel < rel)
                {
                    points.push(IndexPoint { rel, pos });
                    index_changed = true;
                    since = 0;
                }
                since += len;
                pos += len;
                offset += 1;
            }
        }
    };
    Ok(Scan {
        end_pos: pos,
        next_offset: offset,
        points,
        index_changed,
        bytes_since_index: since,
        stop,
    })
}

/// The segment header, or `None` if the file is too short to have one.
fn read_header(file: &File, path: &Path, len: u64) -> Result<Option<[u8; 8]>, SegmentError> {
    if len < SEGMENT_HEADER_BYTES {
        return Ok(None);
    }
    let mut header = [0; 8];
    let mut reader = file;
    reader.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    reader.read_exact(&mut header).map_err(io_err(path))?;
    Ok(Some(header))
}

/// Why a segment header is unacceptable, if it is.
fn header_problem(header: Option<[u8; 8]>) -> Option<String> {
    let Some(header) = header else {
        return Some("the file is shorter than its 8-byte header".into());
    };
    let version = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if header[..4] != HEADER[..4] {
        Some("not a cloudtap segment file (bad magic)".into())
    } else if header[4..] != HEADER[4..] {
        Some(format!(
            "segment format version {version} is not supported by this build (it reads version 1); upgrade cloudtap"
        ))
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Entry and index encoding

enum Decoded {
    /// A valid entry of this many bytes (overhead included); the payload is in the buffer.
    Entry { len: u64 },
    /// Clean end of file at an entry boundary.
    End,
    /// An incomplete or invalid entry, and why.
    Bad(String),
}

fn encode_entry(out: &mut Vec<u8>, offset: u64, payload: &[u8]) {
    let start = out.len();
    // `append` checked `payload.len() <= MAX_ENTRY_BYTES`, so it fits the u32.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Reads one entry that must carry `expected` as its offset; its payload into `payload`.
fn read_entry(r: &mut impl Read, expected: u64, payload: &mut Vec<u8>) -> io::Result<Decoded> {
    let mut head = [0; 12];
    match read_full(r, &mut head)? {
        0 => return Ok(Decoded::End),
        12 => {}
        n => return Ok(Decoded::Bad(format!("torn entry: {n} of 12 header bytes"))),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let offset = u64::from_le_bytes(head[4..].try_into().expect("8 bytes"));
    if len > MAX_ENTRY_BYTES {
        return Ok(Decoded::Bad(format!(
            "length field {len} exceeds the maximum entry size {MAX_ENTRY_BYTES}"
        )));
    }
    if offset != expected {
        return Ok(Decoded::Bad(format!(
            "entry carries offset {offset}, expected {expected}"
        )));
    }
    payload.clear();
    payload.resize(len + 4, 0);
    let n = read_full(r, payload)?;
    if n < len + 4 {
        return Ok(Decoded::Bad(format!(
            "torn entry: {n} of {} payload and checksum bytes",
            len + 4
        )));
    }
    let stored = u32::from_le_bytes(payload[len..].try_into().expect("4 bytes"));
    payload.truncate(len);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), payload);
    if crc != stored {
        return Ok(Decoded::Bad(format!(
            "checksum mismatch for offset {offset} (stored {stored:#010x}, computed {crc:#010x})"
        )));
    }
    Ok(Decoded::Entry {
        len: ENTRY_OVERHEAD + len as u64,
    })
}

/// Like `read_exact`, but reports how much was there instead of failing at EOF.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn encode_index(points: &[IndexPoint], out: &mut Vec<u8>) {
    for p in points {
        out.extend_from_slice(&p.rel.to_le_bytes());
        out.extend_from_slice(&p.pos.to_le_bytes());
    }
}

/// Reads an index, keeping its longest plausible prefix for a log of `log_len` bytes:
/// strictly increasing, at least one minimal entry apart, inside the log. Also says
/// whether the file was exactly that (`false`: missing, torn or with garbage).
fn read_index(path: &Path, log_len: u64) -> Result<(Vec<IndexPoint>, bool), SegmentError> {
    let raw = match fs::read(path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut points: Vec<IndexPoint> = Vec::with_capacity(raw.len() / INDEX_POINT_BYTES);
    for chunk in raw.chunks_exact(INDEX_POINT_BYTES) {
        let rel = u32::from_le_bytes(chunk[..4].try_into().expect("4 bytes"));
        let pos = u64::from_le_bytes(chunk[4..].try_into().expect("8 bytes"));
        let (prev_rel, prev_pos) = points
            .last()
            .map_or((0, SEGMENT_HEADER_BYTES), |p| (p.rel, p.pos));
        let plausible = rel > prev_rel
            && pos < log_len
            && pos >= prev_pos + u64::from(rel - prev_rel) * ENTRY_OVERHEAD;
        if !plausible {
            break;
        }
        points.push(IndexPoint { rel, pos });
    }
    let clean = points.len() * INDEX_POINT_BYTES == raw.len();
    Ok((points, clean))
}

/// Replaces an index file; returns it open for appending, with its length.
fn write_index(path: &Path, points: &[IndexPoint]) -> Result<(File, u64), SegmentError> {
    let mut buf = Vec::with_capacity(points.len() * INDEX_POINT_BYTES);
    encode_index(points, &mut buf);
    let mut file = File::create(path).map_err(io_err(path))?;
    file.write_all(&buf).map_err(io_err(path))?;
    file.sync_data().map_err(io_err(path))?;
    Ok((file, buf.len() as u64))
}

// ---------------------------------------------------------------------------------------
// Reading

/// An independent reader (opens its own file handles) that can run on another thread while the
/// writer appends. Reads entries with offset >= `from`, stopping at `end` (exclusive) — the caller
/// passes the writer's `next_offset()` or `durable_offset()` snapshot so it never reads a partially
/// written entry. Uses the sparse index to seek to `from` without scanning the whole segment.
///
/// Every entry's CRC and offset are checked; the first failure is yielded as an error
/// and ends the iteration.
#[derive(Debug)]
pub struct SegmentReader {
    dir: PathBuf,
    from: u64,
    next: u64,
    end: u64,
    current: Option<ReadSegment>,
    failed: bool,
}

#[derive(Debug)]
struct ReadSegment {
    base: u64,
    path: PathBuf,
    reader: BufReader<File>,
    pos: u64,
}

impl SegmentReader {
    pub fn open(dir: &Path, from: u64, end: u64) -> Result<SegmentReader, SegmentError> {
        let mut reader = SegmentReader {
            dir: dir.to_path_buf(),
            from,
            next: from,
            end,
            current: None,
            failed: false,
        };
        if from >= end {
            return Ok(reader);
        }
        let bases = list_segments(dir)?;
        match bases.iter().rposition(|&b| b <= from) {
            Some(i) => reader.current = Some(reader.open_segment(bases[i])?),
            None => return Err(reader.missing(from)),
        }
        Ok(reader)
    }

    /// Lets the reader go on up to a later `end` (the writer's new durable end), so a
    /// tailing reader keeps its open file and position instead of reopening and
    /// re-reading the index on every append. The log only grows, so bytes already
    /// buffered past the old end are the bytes that now lie before the new one.
    pub fn extend_end(&mut self, end: u64) {
        self.end = self.end.max(end);
        if self.failed {
            return;
        }
        // A reader opened empty (from >= end) never opened its segment.
        if self.current.is_none() && self.next < self.end && self.next == self.from {
            match list_segments(&self.dir).map(|bases| {
                bases
                    .iter()
                    .rposition(|&b| b <= self.next)
                    .map(|i| bases[i])
            }) {
                Ok(Some(base)) => match self.open_segment(base) {
                    Ok(seg) => self.current = Some(seg),
                    Err(_) => self.failed = true,
                },
                _ => self.failed = true,
            }
        }
    }

    /// Opens segment `base` positioned at the last index point at or before `self.next`
    /// (a valid one: a stale point is ignored and the segment read from its start).
    fn open_segment(&mut self, base: u64) -> Result<ReadSegment, SegmentError> {
        let path = log_path(&self.dir, base);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.missing(self.next)),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let len = file.metadata().map_err(io_err(&path))?.len();
        if let Some(reason) = header_problem(read_header(&file, &path, len)?) {
            return Err(SegmentError::Corrupt {
                path,
                offset: 0,
                reason,
            });
        }
        let mut reader = BufReader::with_capacity(64 << 10, file);
        let (mut start, mut pos) = (base, SEGMENT_HEADER_BYTES);
        if self.next > base {
            let (points, _) = read_index(&index_path(&self.dir, base), len)?;
            let below = points.partition_point(|p| base + u64::from(p.rel) <= self.next);
            if let Some(p) = below.checked_sub(1).map(|i| points[i]) {
                let at = base + u64::from(p.rel);
                reader.seek(SeekFrom::Start(p.pos)).map_err(io_err(&path))?;
                let mut scratch = Vec::new();
                if let Decoded::Entry { .. } =
                    read_entry(&mut reader, at, &mut scratch).map_err(io_err(&path))?
                {
                    (start, pos) = (at, p.pos);
                } else {
                    tracing::debug!(index = %index_path(&self.dir, base).display(), "stale index point ignored");
                }
            }
        }
        reader.seek(SeekFrom::Start(pos)).map_err(io_err(&path))?;
        self.next = start;
        Ok(ReadSegment {
            base,
            path,
            reader,
            pos,
        })
    }

    /// The error for "no segment holds `offset`": removed by retention, or past the end.
    fn missing(&self, offset: u64) -> SegmentError {
        match list_segments(&self.dir) {
            Ok(bases) => match bases.first() {
                Some(&first) if first > offset => SegmentError::OffsetRemoved {
                    requested: offset,
                    first_available: first,
                },
                _ => SegmentError::EndBeyondLog {
                    dir: self.dir.clone(),
                    offset,
                    end: self.end,
                },
            },
            Err(e) => e,
        }
    }

    fn read_next(&mut self) -> Result<Option<(u64, Vec<u8>)>, SegmentError> {
        while self.next < self.end {
            let seg = match &mut self.current {
                Some(seg) => seg,
                None => {
                    // Segments are contiguous: the next one is named by the next offset.
                    let seg = self.open_segment(self.next)?;
                    self.current.insert(seg)
                }
            };
            let mut payload = Vec::new();
            match read_entry(&mut seg.reader, self.next, &mut payload).map_err(io_err(&seg.path))? {
                Decoded::Entry { len } => {
                    seg.pos += len;
                    self.next += 1;
                    if self.next > self.from {
                        return Ok(Some((self.next - 1, payload)));
                    }
                }
                Decoded::End if seg.base < self.next => self.current = None,
                Decoded::End => return Err(self.missing(self.next)),
                Decoded::Bad(reason) => {
                    return Err(SegmentError::Corrupt {
                        path: seg.path.clone(),
                        offset: seg.pos,
                        reason,
                    });
                }
            }
        }
        Ok(None)
    }
}

impl Iterator for SegmentReader {
    type Item = Result<(u64, Vec<u8>), SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.read_next().transpose();
        self.failed = matches!(item, Some(Err(_)));
        item
    }
}

// ---------------------------------------------------------------------------------------
// Files and directories

fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// First offsets of the segments in `dir`, ascending.
fn list_segments(dir: &Path) -> Result<Vec<u64>, SegmentError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let name = entry.map_err(io_err(dir))?.file_name();
        if let Some(base) = name.to_str().and_then(parse_segment_name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> SegmentError + Copy {
    move |source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes file creations and removals in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), SegmentError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

/// Takes the directory's writer lock, waiting briefly for a previous owner that is
/// shutting down. Filesystems without locks get a warning, not a refusal.
fn lock_dir(dir: &Path) -> Result<File, SegmentError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(SegmentError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {
                tracing::warn!(dir = %dir.display(), "file locking unsupported; not guarding against a second writer");
                return Ok(file);
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Damage<'a> = &'a dyn Fn(&mut Vec<u8>);

    fn temp_dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    fn config(dir: &Path, segment_bytes: u64, index_interval_bytes: u64) -> SegmentConfig {
        SegmentConfig {
            segment_bytes,
            index_interval_bytes,
            ..SegmentConfig::new(dir)
        }
    }

    /// `n` payloads of sizes 0..200 with recognisable contents.
    fn payloads(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                (0..(i * 37 + 11) % 200)
                    .map(|j| (i * 7 + j) as u8)
                    .collect()
            })
            .collect()
    }

    fn append_all(log: &mut SegmentLog, entries: &[Vec<u8>], batch: usize) {
        for chunk in entries.chunks(batch.max(1)) {
            let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            let start = log.next_offset();
            let range = log.append(&refs).unwrap();
            assert_eq!(range, start..start + chunk.len() as u64);
        }
    }

    fn read(dir: &Path, from: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, SegmentError> {
        SegmentReader::open(dir, from, end)?.collect()
    }

    fn expected(entries: &[Vec<u8>], from: u64, end: u64) -> Vec<(u64, Vec<u8>)> {
        (from..end)
            .map(|o| (o, entries[o as usize].clone()))
            .collect()
    }

    fn copy_dir(from: &Path, to: &Path) {
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }

    fn mutate(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
        let mut bytes = fs::read(path).unwrap();
        f(&mut bytes);
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn round_trip_across_rolls_and_reopen() {
        let dir = temp_dir();
        let mut entries = payloads(120);
        {
            let (mut log, report) = SegmentLog::open(config(dir.path(), 300, 64)).unwrap();
            assert_eq!(
                report,
                RecoveryReport {
                    segments: 1,
                    ..Default::default()
                }
            );
            append_all(&mut log, &entries, 7);
            assert_eq!(log.sync().unwrap(), 120);
            assert_eq!(log.durable_offset(), 120);
        }
        let (mut log, report) = SegmentLog::open(config(dir.path(), 300, 64)).unwrap();
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() >= 5, "{segments:?}");
        assert_eq!(report.segments, segments.len());
        assert_eq!(
            (
                report.entries,
                report.truncated_bytes,
                report.rebuilt_indexes
            ),
            (120, 0, 0)
        );
        assert_eq!(log.next_offset(), 120);
        let more = payloads(150).split_off(120);
        append_all(&mut log, &more, 3);
        entries.extend(more);
        assert_eq!(log.next_offset(), 150);
        // Readers need not wait for an fsync: `next_offset` is safe to read up to.
        for from in 0..=150 {
            for end in [from, from + 1, from + 17, 150] {
                let end = end.min(150);
                assert_eq!(
                    read(dir.path(), from, end).unwrap(),
                    expected(&entries, from, end)
                );
            }
        }
        let on_disk: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name() != LOCK_FILE)
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert_eq!(log.disk_bytes(), on_disk);
    }

    #[test]
    fn one_reader_follows_the_writer_with_extend_end() {
        let dir = temp_dir();
        let (mut log, _) = SegmentLog::open(config(dir.path(), 512, 64)).unwrap();
        let entries = payloads(300);
        // Opened before anything exists (from == end), then only ever extended,
        // across segment rolls.
        let mut reader = SegmentReader::open(dir.path(), 0, 0).unwrap();
        assert!(reader.next().is_none());
        let mut next = 0u64;
        for chunk in entries.chunks(7) {
            append_all(&mut log, chunk, 7);
            reader.extend_end(log.next_offset());
            for item in reader.by_ref() {
                let (offset, payload) = item.unwrap();
                assert_eq!((offset, &payload), (next, &entries[next as usize]));
                next += 1;
            }
        }
        assert_eq!(next, 300);
    }

    #[test]
    fn reader_runs_beside_the_writer() {
        let dir = temp_dir();
        let (mut log, _) = SegmentLog::open(config(dir.path(), 512, 64)).unwrap();
        let entries = payloads(300);
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let path = dir.path().to_path_buf();
        let expect = entries.clone();
        let reader = std::thread::spawn(move || {
            let mut next = 0;
            for end in rx {
                for item in SegmentReader::open(&path, next, end).unwrap() {
                    let (offset, payload) = item.unwrap();
                    assert_eq!((offset, &payload), (next, &expect[next as usize]));
                    next += 1;
                }
            }
            next
        });
        for chunk in entries.chunks(5) {
            append_all(&mut log, chunk, 5);
            tx.send(log.next_offset()).unwrap();
        }
        drop(tx);
        assert_eq!(reader.join().unwrap(), 300);
    }

    /// Damages the last segment of a 30-entry fixture at every byte of its last three
    /// entries, by truncation and by flipping a byte, and checks what recovery keeps.
    fn check_tail_damage(index_interval_bytes: u64) {
        const SEGMENT_BYTES: u64 = 700;
        let fixture = temp_dir();
        let entries = payloads(30);
        {
            let cfg = config(fixture.path(), SEGMENT_BYTES, index_interval_bytes);
            let (mut log, _) = SegmentLog::open(cfg).unwrap();
            append_all(&mut log, &entries, 4);
            log.sync().unwrap();
        }
        let bases = list_segments(fixture.path()).unwrap();
        assert!(bases.len() >= 2, "{bases:?}");
        let base = *bases.last().unwrap();
        // Byte layout of the last segment: where each of its entries starts and ends.
        let mut spans = Vec::new();
        let mut pos = SEGMENT_HEADER_BYTES;
        for entry in &entries[base as usize..] {
            spans.push((pos, pos + ENTRY_OVERHEAD + entry.len() as u64));
            pos += ENTRY_OVERHEAD + entry.len() as u64;
        }
        assert!(
            spans.len() >= 3,
            "last segment holds {} entries",
            spans.len()
        );
        let log_name = log_path(Path::new(""), base);
        let file_len = fs::metadata(fixture.path().join(&log_name)).unwrap().len();
        assert_eq!(file_len, pos);
        // Recovery trusts the bytes before the last index point (they were fsynced
        // before the point was written); damage there is left for readers to report.
        let index = fs::read(index_path(fixture.path(), base)).unwrap();
        let last_point = index
            .chunks_exact(12)
            .last()
            .map_or(0, |c| u64::from_le_bytes(c[4..].try_into().unwrap()));

        let check = |damage: Damage, survivors: u64, unread: Option<u64>| {
            let dir = temp_dir();
            copy_dir(fixture.path(), dir.path());
            let path = dir.path().join(&log_name);
            mutate(&path, damage);
            let damaged_len = fs::metadata(&path).unwrap().len();
            let cfg = config(dir.path(), SEGMENT_BYTES, index_interval_bytes);
            let (mut log, report) = SegmentLog::open(cfg.clone()).unwrap();
            assert_eq!(log.next_offset(), survivors);
            assert_eq!(report.entries, survivors);
            let kept_len = spans
                .get((survivors - base) as usize)
                .map_or(file_len, |s| s.0);
            assert_eq!(fs::metadata(&path).unwrap().len(), kept_len);
            assert_eq!(report.truncated_bytes, damaged_len - kept_len);
            let truncated = (damaged_len > kept_len).then(|| path.clone());
            assert_eq!(report.truncated_file, truncated);
            match unread {
                None => assert_eq!(
                    read(dir.path(), 0, survivors).unwrap(),
                    expected(&entries, 0, survivors)
                ),
                Some(bad) => {
                    let items: Vec<_> = SegmentReader::open(dir.path(), 0, survivors)
                        .unwrap()
                        .collect();
                    assert_eq!(items.len() as u64, bad + 1);
                    assert!(matches!(
                        items[bad as usize],
                        Err(SegmentError::Corrupt { .. })
                    ));
                }
            }
            // Appends continue at the right offset and read back, also after a reopen.
            assert_eq!(
                log.append(&[b"after", b""]).unwrap(),
                survivors..survivors + 2
            );
            log.sync().unwrap();
            drop(log);
            let (log, report) = SegmentLog::open(cfg).unwrap();
            assert_eq!(
                (log.next_offset(), report.truncated_bytes),
                (survivors + 2, 0)
            );
            let tail = read(dir.path(), survivors, survivors + 2).unwrap();
            assert_eq!(
                tail,
                vec![(survivors, b"after".to_vec()), (survivors + 1, vec![])]
            );
        };

        let from = spans[spans.len() - 3].0;
        for cut in from..=file_len {
            let intact = spans.iter().filter(|s| s.1 <= cut).count() as u64;
            check(
                &|b: &mut Vec<u8>| b.truncate(cut as usize),
                base + intact,
                None,
            );
        }
        let (mut detected, mut deferred) = (0, 0);
        for at in from..file_len {
            let hit = spans.iter().position(|s| s.0 <= at && at < s.1).unwrap() as u64;
            let flip = |b: &mut Vec<u8>| b[at as usize] ^= 0xFF;
            if spans[hit as usize].0 >= last_point {
                detected += 1;
                check(&flip, base + hit, None);
            } else {
                deferred += 1;
                check(&flip, entries.len() as u64, Some(base + hit));
            }
        }
        assert!(detected > 0);
        if index_interval_bytes >= SEGMENT_BYTES {
            assert_eq!(
                deferred, 0,
                "without index points the whole tail segment is scanned"
            );
        } else {
            assert!(
                deferred > 0,
                "the fixture should have index points in its last entries"
            );
        }
    }

    #[test]
    fn torn_or_corrupt_tail_recovers_the_intact_prefix() {
        check_tail_damage(4096);
    }

    #[test]
    fn torn_or_corrupt_tail_recovers_the_intact_prefix_with_index() {
        check_tail_damage(48);
    }

    #[test]
    fn corruption_in_a_sealed_segment_is_an_error() {
        let fixture = temp_dir();
        let entries = payloads(40);
        {
            let (mut log, _) = SegmentLog::open(config(fixture.path(), 600, 4096)).unwrap();
            append_all(&mut log, &entries, 40);
            log.sync().unwrap();
        }
        let first = fixture.path().join(log_path(Path::new(""), 0));
        let len = fs::metadata(&first).unwrap().len() as usize;
        let damages: [(&str, Damage); 5] = [
            ("flip in the middle", &|b| b[len / 2] ^= 0xFF),
            ("flip in the last entry", &|b| b[len - 2] ^= 0xFF),
            ("truncated", &|b| b.truncate(len - 1)),
            ("trailing garbage", &|b| b.extend_from_slice(&[0; 20])),
            ("bad magic", &|b| b[0] = b'X'),
        ];
        for (what, damage) in damages {
            let dir = temp_dir();
            copy_dir(fixture.path(), dir.path());
            let path = dir.path().join(first.file_name().unwrap());
            mutate(&path, damage);
            let before = fs::read(&path).unwrap();
            match SegmentLog::open(config(dir.path(), 600, 4096)) {
                Err(SegmentError::Corrupt { path: p, .. }) => assert_eq!(p, path, "{what}"),
                other => panic!("{what}: expected Corrupt, got {:?}", other.map(|(_, r)| r)),
            }
            assert_eq!(
                fs::read(&path).unwrap(),
                before,
                "{what}: a sealed segment is never modified"
            );
        }
    }

    #[test]
    fn retention_removes_only_whole_sealed_segments() {
        let dir = temp_dir();
        let entries = payloads(100);
        let (mut log, _) = SegmentLog::open(config(dir.path(), 400, 64)).unwrap();
        append_all(&mut log, &entries, 3);
        let bases = list_segments(dir.path()).unwrap();
        assert!(bases.len() >= 4, "{bases:?}");
        let before = log.disk_bytes();
        // Below the end of the second segment, but not all of it: only the first goes.
        assert_eq!(log.remove_segments_below(bases[2] - 1).unwrap(), 1);
        assert_eq!(log.first_offset(), bases[1]);
        assert!(log.disk_bytes() < before);
        assert_eq!(log.remove_segments_below(bases[2]).unwrap(), 1);
        assert_eq!(log.first_offset(), bases[2]);
        assert_eq!(list_segments(dir.path()).unwrap(), bases[2..]);
        assert_eq!(
            read(dir.path(), bases[2], 100).unwrap(),
            expected(&entries, bases[2], 100)
        );
        match read(dir.path(), 0, 100) {
            Err(SegmentError::OffsetRemoved {
                requested: 0,
                first_available,
            }) => {
                assert_eq!(first_available, bases[2]);
            }
            other => panic!("expected OffsetRemoved, got {other:?}"),
        }
        // Never the active segment, even when everything is below the bound.
        log.remove_segments_below(u64::MAX).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), [*bases.last().unwrap()]);
        let last = log.first_offset();
        assert_eq!(
            read(dir.path(), last, 100).unwrap(),
            expected(&entries, last, 100)
        );
        assert_eq!(log.append(&[b"x"]).unwrap(), 100..101);
        drop(log);
        let (log, report) = SegmentLog::open(config(dir.path(), 400, 64)).unwrap();
        assert_eq!((log.first_offset(), log.next_offset()), (last, 101));
        assert_eq!(report.entries, 101 - last);
    }

    #[test]
    fn missing_or_garbage_index_is_rebuilt() {
        let dir = temp_dir();
        let entries = payloads(100);
        {
            let (mut log, _) = SegmentLog::open(config(dir.path(), 2000, 64)).unwrap();
            append_all(&mut log, &entries, 100);
            log.sync().unwrap();
        }
        let bases = list_segments(dir.path()).unwrap();
        assert!(bases.len() >= 3, "{bases:?}");
        let indexes: Vec<Vec<u8>> = bases
            .iter()
            .map(|&b| fs::read(index_path(dir.path(), b)).unwrap())
            .collect();
        assert!(indexes.iter().all(|i| i.len() >= 3 * INDEX_POINT_BYTES));
        fs::remove_file(index_path(dir.path(), *bases.last().unwrap())).unwrap();
        fs::write(index_path(dir.path(), bases[0]), [0xA5; 100]).unwrap();
        mutate(&index_path(dir.path(), bases[1]), |b| {
            b.truncate(b.len() - 17);
            // A plausible-looking point that names the wrong byte position.
            let n = b.len() - b.len() % 12;
            b[n - 8] += 1;
        });
        let (_log, report) = SegmentLog::open(config(dir.path(), 2000, 64)).unwrap();
        assert_eq!((report.rebuilt_indexes, report.truncated_bytes), (3, 0));
        for (&base, original) in bases.iter().zip(&indexes) {
            assert_eq!(&fs::read(index_path(dir.path(), base)).unwrap(), original);
        }
        for from in (0..100).step_by(7) {
            assert_eq!(
                read(dir.path(), from, 100).unwrap(),
                expected(&entries, from, 100)
            );
        }
    }

    #[test]
    fn a_segment_torn_while_being_created_is_empty() {
        let fixture = temp_dir();
        let entries = payloads(20);
        {
            let (mut log, _) = SegmentLog::open(config(fixture.path(), 500, 64)).unwrap();
            append_all(&mut log, &entries, 20);
            log.sync().unwrap();
        }
        // The next segment's file appeared, but not (all of) its header.
        for torn in [&b""[..], b"CTS", &[0; 40]] {
            let dir = temp_dir();
            copy_dir(fixture.path(), dir.path());
            fs::write(log_path(dir.path(), 20), torn).unwrap();
            let segments = list_segments(dir.path()).unwrap().len();
            let (mut log, report) = SegmentLog::open(config(dir.path(), 500, 64)).unwrap();
            assert_eq!((report.segments, report.entries), (segments, 20));
            assert_eq!(report.truncated_bytes, torn.len() as u64);
            assert_eq!(log.append(&[b"next"]).unwrap(), 20..21);
            let got = read(dir.path(), 19, 21).unwrap();
            assert_eq!(got, [(19, entries[19].clone()), (20, b"next".to_vec())]);
        }
    }

    #[test]
    fn reader_seeks_with_the_index() {
        let dir = temp_dir();
        let entries = payloads(100);
        let (mut log, _) = SegmentLog::open(config(dir.path(), 1 << 20, 64)).unwrap();
        append_all(&mut log, &entries, 100);
        log.sync().unwrap();
        // Damage entry 1: a reader that starts later must not even look at it.
        let at = SEGMENT_HEADER_BYTES + ENTRY_OVERHEAD + entries[0].len() as u64 + 3;
        mutate(&log_path(dir.path(), 0), |b| b[at as usize] ^= 0xFF);
        assert_eq!(
            read(dir.path(), 90, 100).unwrap(),
            expected(&entries, 90, 100)
        );
        let err = read(dir.path(), 0, 100).unwrap_err();
        assert!(
            matches!(err, SegmentError::Corrupt { offset, .. } if offset == at - 3),
            "{err}"
        );
    }

    #[test]
    fn errors_say_what_went_wrong() {
        let dir = temp_dir();
        let (mut log, _) = SegmentLog::open(config(dir.path(), 1 << 20, 64)).unwrap();
        let big = vec![0; MAX_ENTRY_BYTES + 1];
        let err = log.append(&[b"fine", &big]).unwrap_err();
        assert!(matches!(err, SegmentError::EntryTooLarge { .. }), "{err}");
        assert_eq!(log.next_offset(), 0, "a rejected batch writes nothing");
        assert_eq!(log.append(&[&big[1..]]).unwrap(), 0..1);

        let err = SegmentReader::open(dir.path(), 1, 5)
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                err,
                SegmentError::EndBeyondLog {
                    offset: 1,
                    end: 5,
                    ..
                }
            ),
            "{err}"
        );
        let err = SegmentLog::open(config(dir.path(), 1 << 20, 64))
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, SegmentError::Locked { .. }), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn written_entries_read_back_after_reopen(
            entries in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..60),
            segment_bytes in 16u64..2048,
            index_interval_bytes in 0u64..512,
            batch in 1usize..8,
            reopen_midway in any::<bool>(),
        ) {
            let dir = temp_dir();
            let cfg = config(dir.path(), segment_bytes, index_interval_bytes);
            let half = if reopen_midway { entries.len() / 2 } else { entries.len() };
            for part in [&entries[..half], &entries[half..]] {
                let (mut log, report) = SegmentLog::open(cfg.clone()).unwrap();
                prop_assert_eq!(report.truncated_bytes, 0);
                append_all(&mut log, part, batch);
            }
            let (log, report) = SegmentLog::open(cfg).unwrap();
            let n = entries.len() as u64;
            prop_assert_eq!((log.next_offset(), report.entries), (n, n));
            prop_assert_eq!(read(dir.path(), 0, n).unwrap(), expected(&entries, 0, n));
            prop_assert_eq!(read(dir.path(), n / 3, n).unwrap(), expected(&entries, n / 3, n));
        }
    }
}
