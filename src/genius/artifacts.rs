//! Run artifacts that survive interruption: append-only JSON Lines logs that resume where they
//! stopped, and small JSON files replaced atomically.
//!
//! A [`JsonlLog`] is written one complete line at a time, each flushed and synced, so after a
//! crash the file holds whole records plus at most one torn last line. Reopening it reads the
//! whole records back (a malformed line *before* the last is an error naming the line: that is
//! not an interruption but a damaged file) and cuts the torn tail off before appending.
//!
//! Fault injection for the resume tests: with `GENIUS_ABORT_AFTER=<file name>:<n>` in the
//! environment, the process aborts (as a kill would stop it) right after the `n`-th record it
//! appends to logs of that file name (counted over the whole process, e.g. across rounds) is
//! durable.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// An append-only JSONL file of records of one type.
pub struct JsonlLog {
    file: File,
    path: PathBuf,
    /// The count at which to abort (fault injection), when this log's name is the one given.
    abort_after: Option<usize>,
}

/// Records appended by this process to logs named in `GENIUS_ABORT_AFTER`.
static FAULT_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The `GENIUS_ABORT_AFTER` count that applies to `path`, if any.
fn abort_after(path: &Path) -> Option<usize> {
    let spec = std::env::var("GENIUS_ABORT_AFTER").ok()?;
    let (name, n) = spec.rsplit_once(':')?;
    (path.file_name()?.to_str()? == name).then(|| n.parse().ok())?
}

impl JsonlLog {
    /// Opens (creating if missing) `path` and returns the records already in it. A last line
    /// that is incomplete (no newline, or does not parse) is removed; any other bad line is an
    /// error.
    pub fn open<T: DeserializeOwned>(path: &Path) -> Result<(Self, Vec<T>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for appending", path.display()))?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .with_context(|| format!("{}: cannot read (not UTF-8 text?)", path.display()))?;
        let mut records = Vec::new();
        let mut good_len = 0usize;
        let mut offset = 0usize;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let is_last = i + 1 == lines.len();
            let complete = line.ends_with('\n');
            let body = line.trim();
            offset += line.len();
            if body.is_empty() {
                if complete {
                    good_len = offset;
                }
                continue;
            }
            match serde_json::from_str::<T>(body) {
                Ok(r) if complete => {
                    records.push(r);
                    good_len = offset;
                }
                // A record without its newline or one that does not parse, at the very end:
                // the write was interrupted.
                _ if is_last => {}
                Ok(_) => unreachable!("only the last piece can lack a newline"),
                Err(e) => bail!("{}: line {}: {e}", path.display(), i + 1),
            }
        }
        if good_len < text.len() {
            file.set_len(good_len as u64).with_context(|| {
                format!("{}: cannot cut an interrupted last line", path.display())
            })?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                abort_after: abort_after(path),
            },
            records,
        ))
    }

    /// Appends one record as a line and makes it durable before returning.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("{}: cannot append", self.path.display()))?;
        if let Some(n) = self.abort_after {
            let count = FAULT_COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if count == n {
                eprintln!(
                    "GENIUS_ABORT_AFTER: aborting after record {count} appended to {}",
                    self.path.display()
                );
                std::process::abort();
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `bytes` to `path` atomically (temporary sibling, sync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::anyhow!("{}: cannot write: {e}", path.display())
    })
}

/// Writes a value as pretty JSON, atomically.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Records the settings of a resumable job in `path`, or, when resuming, checks they are the
/// ones it started with: a resumed job must not mix results made under other settings.
pub fn check_same_settings(path: &Path, settings: &serde_json::Value) -> Result<()> {
    if let Ok(text) = fs::read_to_string(path) {
        let old: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        if &old != settings {
            let differs: Vec<&str> = settings
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| old.get(k.as_str()) != Some(v))
                .map(|(k, _)| k.as_str())
                .collect();
            bail!(
                "{} was started with other settings ({} differ); resume with the same flags or use a new output folder",
                path.parent().unwrap_or(path).display(),
                differs.join(", ")
            );
        }
        return Ok(());
    }
    write_json_atomic(path, settings)
}

/// Creates a run folder (and parents), with an error that names it.
pub fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Rec {
        id: u32,
    }

    #[test]
    fn resumes_after_a_torn_line_and_keeps_whole_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        {
            let (mut log, old) = JsonlLog::open::<Rec>(&path).unwrap();
            assert!(old.is_empty());
            log.append(&Rec { id: 1 }).unwrap();
            log.append(&Rec { id: 2 }).unwrap();
        }
        // An interrupted write leaves half a record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\": 3").unwrap();
        drop(f);
        let (mut log, old) = JsonlLog::open::<Rec>(&path).unwrap();
        assert_eq!(old, vec![Rec { id: 1 }, Rec { id: 2 }]);
        log.append(&Rec { id: 3 }).unwrap();
        drop(log);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"id\":1}\n{\"id\":2}\n{\"id\":3}\n");
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        fs::write(&path, "{\"id\":1}\nnot json\n{\"id\":2}\n").unwrap();
        let err = JsonlLog::open::<Rec>(&path).err().unwrap().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("log.jsonl"), "{err}");
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_json_atomic(&path, &Rec { id: 7 }).unwrap();
        write_json_atomic(&path, &Rec { id: 8 }).unwrap();
        let back: Rec = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, Rec { id: 8 });
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
